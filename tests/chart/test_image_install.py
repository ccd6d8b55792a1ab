"""The images' install step, run for real: the Dockerfile's build context (exactly the files it
COPYs) installed with `pip install .[operator]` / `.[trainer]` into a clean virtual environment,
as the image build does. uv stands in for pip for speed (same resolution of the same metadata,
sharing its download cache); a broken image build shows up here without a Docker engine."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.prefix) / "bin" / "uv"


def build_context(destination: Path) -> Path:
    """Copy what the Dockerfile's `source` stage COPYs from the context, and nothing else."""
    source = destination / "src"
    source.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for instruction in DockerfileParser(path=str(REPO / "Dockerfile")).structure:
        if instruction["instruction"] != "COPY" or "--from=" in instruction["value"]:
            continue
        *sources, target = shlex.split(instruction["value"])
        for item in sources:
            path = REPO / item
            if path.is_dir():
                shutil.copytree(path, source / target, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(path, source / target if target != "./" else source / path.name)
    return source


def run(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, check=False, env=env, cwd="/")  # fmt: skip
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def clean_venv_with(extra: str, tmp_path: Path) -> Path:
    source = build_context(tmp_path)
    venv = tmp_path / "venv"
    run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    # Not editable: the image installs a built wheel from the copied context.
    run(UV, "pip", "install", "--quiet", "--python", python, f"{source}[{extra}]")
    return venv


def installed(venv: Path) -> set[str]:
    listing = run(UV, "pip", "list", "--python", venv / "bin" / "python", "--format", "freeze")
    return {line.split("==")[0].lower() for line in listing.stdout.splitlines()}


def test_operator_image_install_gives_a_working_operator_without_torch(tmp_path: Path) -> None:
    venv = clean_venv_with("operator", tmp_path)

    help_text = run(venv / "bin" / "kubetune-operator", "--help").stdout
    assert "kubetune-operator" in help_text
    packages = installed(venv)
    assert {"kubetune", "kopf", "kubernetes", "pydantic-settings"} <= packages
    assert not packages & {"torch", "transformers", "trl", "peft", "bitsandbytes", "datasets"}
    run(venv / "bin" / "python", "-c", "import kubetune.operator.handlers")


def test_trainer_image_install_gives_a_working_trainer_with_the_training_stack(
    tmp_path: Path,
) -> None:
    venv = clean_venv_with("trainer", tmp_path)

    help_text = run(venv / "bin" / "kubetune-trainer", "--help").stdout
    assert "--config" in help_text
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "datasets"} <= installed(venv)
    assert "kopf" not in installed(venv)
    run(venv / "bin" / "python", "-c", "import torch, trl, peft, bitsandbytes, datasets")
