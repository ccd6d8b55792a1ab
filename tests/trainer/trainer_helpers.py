"""Helpers shared by the trainer tests (the fixtures themselves live in conftest.py)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAKE_TOKEN = "hf_FAKEtok3n_do_not_leak_9f8e7d6c5b4a"


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    model: Path
    datasets: dict[str, Path]


def job_manifest(
    model: Path,
    dataset: Path | str,
    output: Path | str,
    *,
    training: dict[str, Any] | None = None,
    dataset_extra: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A FineTuneJob for the tiny model, with settings that train in seconds on a CPU."""
    from kubetune_devtools.tiny import demo_manifest

    manifest = copy.deepcopy(demo_manifest(model, Path(str(dataset))))
    manifest["spec"]["dataset"]["uri"] = str(dataset)
    manifest["spec"]["dataset"].update(dataset_extra or {})
    manifest["spec"]["output"]["uri"] = str(output)
    manifest["spec"]["training"].update(training or {})
    if evaluation is None:
        manifest["spec"].pop("evaluation", None)
    else:
        manifest["spec"]["evaluation"] = evaluation
    return manifest


def adapter_on_4bit_base(model_dir: Path, adapter_dir: Path, dtype_name: str) -> Any:
    """A saved adapter on its base loaded in NF4 (double quant, ``dtype_name`` compute) through
    plain PEFT, in eval mode: as a user outside kubetune would load it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, dtype_name)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=dtype
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def config_reporting_progress(
    manifest: dict[str, Any], directory: Path, name: str = "config"
) -> tuple[Path, Path]:
    """The trainer's config for ``manifest`` written to ``directory/name.yaml``, its progress
    reported to a file at once (no rate limit to wait for): (config, progress file)."""
    from kubetune.api.config import TrainerConfig
    from kubetune.api.manifest import load_finetunejob

    progress = directory / ("progress.json" if name == "config" else f"{name}.progress.json")
    config = TrainerConfig(
        spec=load_finetunejob(manifest).spec,
        progress={"reporter": "file", "file": str(progress), "intervalSeconds": 0.01},
    )
    path = directory / f"{name}.yaml"
    path.write_text(config.to_yaml())
    return path, progress


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class TrainedRun:
    exit_code: int
    output: Path
    logs: str
    stdout: str
    termination_message: dict[str, Any]


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line of the block, as a handler on the root logger renders it (tracebacks
    included): what a pod's log would show."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def secret_spellings(secret: str) -> list[str]:
    """The ways a secret could show up in text, as the tests look for them (independently of
    the trainer's own list): as given, stripped, URL-encoded."""
    from urllib.parse import quote, quote_plus

    forms = set()
    for form in (secret, secret.strip()):
        forms |= {form, quote(form, safe=""), quote(form), quote_plus(form)}
    return sorted(forms)


def assert_hidden(secrets: list[str], **places: str) -> None:
    """Fail if any spelling (``secret_spellings``) of any of ``secrets`` shows in the text of a
    place (``logs=...``, ``model_card=...``), naming the place."""
    for secret in secrets:
        for spelling in secret_spellings(secret):
            for name, text in places.items():
                assert spelling not in text, f"{spelling!r} shows in {name}"


def train_job(path: Path, manifest: dict[str, Any], *flags: str) -> tuple[int, str]:
    """Write ``manifest`` to ``path`` and run ``kubetune train`` on it (no progress bars, and
    ``flags``): its exit code and every line it logged."""
    from kubetune.trainer.run.local_run import main as kubetune

    path = write_manifest(path, manifest)
    with captured_logs() as logs:
        code = kubetune(["train", str(path), "--no-progress", *flags])
    return code, logs.getvalue()


def trainer_command(config: Path) -> list[str]:
    """The pod's command for ``config``: the installed ``kubetune-trainer``, else the module."""
    script = Path(sys.executable).with_name("kubetune-trainer")
    if script.exists():
        return [str(script), "--config", str(config)]
    return [sys.executable, "-m", "kubetune.trainer.cli", "--config", str(config)]


def checkpoint_steps(directory: Path) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (those with a trainer state)."""
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1])
        for p in directory.iterdir()
        if p.name.startswith("checkpoint-") and (p / "trainer_state.json").exists()
    )


def stop_with_sigterm_at(
    config: Path, work: Path, progress: Path, step: int
) -> tuple[int, str, dict[str, Any]]:
    """Run ``kubetune-trainer --config config`` in ``work`` until its progress file reports
    ``step``, then send it SIGTERM as a preempted pod gets it: its exit code, its stderr and its
    termination message."""
    import json
    import os
    import signal
    import subprocess
    import time

    def reported() -> int:
        try:
            return int(json.loads(progress.read_text())["step"])
        except (OSError, ValueError, KeyError):
            return 0

    termination = work / "termination-preempted"
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(termination), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(trainer_command(config), cwd=work, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while reported() < step:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return process.returncode, stderr, message


def forward_backward(model: Any, x: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``model(x)`` and the backward of its mean square: the output, the input's gradient and
    every parameter's gradient (by name), in fp32, for comparing layers' implementations."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.float().detach(), x.grad.float(), grads
