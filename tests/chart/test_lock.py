"""uv.lock pins every Python package the images, `make demo` and `make test` install; it must
agree with pyproject.toml (and hack/devtools' pyproject.toml), or those installs refuse to run."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.prefix) / "bin" / "uv"


def test_uv_lock_agrees_with_pyproject() -> None:
    result = subprocess.run(
        [str(UV), "lock", "--locked", "--offline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, f"uv.lock is out of date: run `make lock`\n{result.stderr}"


def test_the_lock_pins_every_extra_and_the_devtools_group() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}

    kubetune = packages["kubetune"]
    assert set(kubetune["optional-dependencies"]) == {"operator", "trainer", "dev"}
    assert "kubetune-devtools" in packages
    for name in ("torch", "kopf", "trl", "pytest"):
        assert packages[name]["version"], name
