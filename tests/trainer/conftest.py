"""Session fixtures for the trainer tests: a tiny model, the toy task, and one real training run.

Everything is built here (nothing is downloaded); the expensive parts are session-scoped so the
whole trainer suite stays within a few minutes on a 2-core machine.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import (
    FAKE_TOKEN,
    TinyAssets,
    TrainedRun,
    adapter_on_4bit_base,
    job_manifest,
    write_manifest,
)

# One thread per process: these models are tiny, and on a small shared machine more threads
# only contend. Set before torch is imported by any test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Offline from the start, not from the first trainer test: huggingface_hub (and datasets) read
# HF_HUB_OFFLINE once, when first imported, and in a whole-tree run the cluster suites import
# transformers first (tests/conftest.py's tiny_assets). Set later, it came too late: the hub tests
# of bad inputs went online and waited out the hub client's retries (70 s on a machine without
# DNS) instead of failing at once as offline.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    import torch

    from kubetune_devtools import tiny

    # Here rather than for every test: the unit tests of pure functions never import torch.
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    model = tiny.write_tiny_model(root / "model")
    datasets = tiny.write_toy_datasets(root / "data")
    return TinyAssets(root=root, model=model, datasets=datasets)


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Caches and termination messages in temp dirs; never a real hub token in the tests (offline
    from the module's import, above)."""
    base = tmp_path_factory.mktemp("env")
    saved = {k: os.environ.get(k) for k in ("KUBETUNE_CACHE_DIR", "HF_TOKEN")}
    os.environ["KUBETUNE_CACHE_DIR"] = str(base / "cache")
    os.environ.pop("HF_TOKEN", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(path))
    return path


@pytest.fixture(scope="session")
def trained(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """`kubetune train` on the toy task, with a (fake) hub token in the environment."""
    import contextlib

    from kubetune.trainer.run.local_run import main
    from kubetune_devtools.tiny import toy_eval_prompts

    work = tmp_path_factory.mktemp("trained")
    output = work / "adapter"
    prompts = [p for p, _ in toy_eval_prompts(3)]
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        output,
        training={"checkpointSteps": 100},
        evaluation={"prompts": prompts, "maxNewTokens": 8},
    )
    path = write_manifest(work / "job.yaml", manifest)
    termination = work / "termination-log"
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    stdout = io.StringIO()
    env = {"HF_TOKEN": FAKE_TOKEN, "KUBETUNE_TERMINATION_LOG": str(termination)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["train", str(path), "--no-progress"])
    finally:
        root.removeHandler(handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return TrainedRun(code, output, captured.getvalue(), stdout.getvalue(), message)


@pytest.fixture(scope="session")
def adapted_model(tiny: TinyAssets, trained: TrainedRun) -> Any:
    """The 4-bit base with the saved adapter loaded onto it through PEFT."""
    assert trained.exit_code == 0, trained.logs[-3000:]
    return adapter_on_4bit_base(tiny.model, trained.output, "float32")
