"""After training: evaluation in every compute dtype on the CPU, and no failure after the adapter
is saved throws the adapter away."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TinyAssets, job_manifest, write_manifest

from kubetune.api.config import TrainerConfig
from kubetune.api.manifest import load_finetunejob
from kubetune.trainer.run.local_run import main as kubetune
from kubetune_devtools.tiny import toy_eval_prompts

pytestmark = pytest.mark.trainer

PROMPTS = {"prompts": [p for p, _ in toy_eval_prompts(2)], "maxNewTokens": 4}


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16", "float32"])
def test_evaluation_prompts_run_on_the_cpu_in_every_compute_dtype(
    tiny: TinyAssets, tmp_path: Path, compute_dtype: str
) -> None:
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        tmp_path / "out",
        training={"maxSteps": 2},
        evaluation=PROMPTS,
    )
    manifest["spec"]["quantization"]["computeDtype"] = compute_dtype
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["outcome"] == "Succeeded"
    assert "not done" not in result["message"]
    assert [s["prompt"] for s in result["evaluation"]["samples"]] == PROMPTS["prompts"]


class FailingHub:
    """A hub that is down: every upload fails."""

    def __init__(self, token: str | None = None) -> None:
        pass

    def create_repo(self, repo_id: str, **_: Any) -> None:
        pass

    def upload_folder(self, **_: Any) -> None:
        raise ConnectionError("503 Service Unavailable\n<html>...</html>")


UPLOADS: list[dict[str, Any]] = []


class WorkingHub(FailingHub):
    def upload_folder(self, **kwargs: Any) -> None:
        UPLOADS.append(kwargs)


def _broken_evaluation(*_: Any, **__: Any) -> None:
    raise RuntimeError("expected m1 and m2 to have the same dtype")


def test_a_failure_after_the_adapter_is_saved_keeps_it_and_a_retry_publishes_without_training(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from kubetune.trainer.run import evaluation
    from kubetune.trainer.run.runner import run

    monkeypatch.setattr(evaluation, "compare_base_and_adapter", _broken_evaluation)
    monkeypatch.setattr(huggingface_hub, "HfApi", FailingHub)
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["text"],
        tmp_path / "out",
        training={"maxSteps": 3, "checkpointSteps": 2},
        evaluation=PROMPTS,
    )
    manifest["spec"]["output"]["pushToHub"] = {
        "repoId": "my-org/tiny-reverse",
        "tokenSecretRef": {"name": "hub-write"},
    }
    config = TrainerConfig(spec=load_finetunejob(manifest).spec)

    first = run(config)
    assert first.exit_code == 1  # the Job retries
    weights = tmp_path / "out" / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (result["outcome"], result["reason"]) == ("Failed", "TrainerError")
    assert result["adapter"]["sha256"] == digest
    assert "evaluation prompts failed (RuntimeError: expected m1 and m2" in result["message"]
    assert "push to hub failed (ConnectionError: 503 Service Unavailable)" in result["message"]
    assert "the adapter is saved" in result["message"]
    assert json.loads(termination_log.read_text()) == result
    assert (tmp_path / "out" / "README.md").is_file()  # the reports that worked are there

    # The hub is back. The retried pod resumes from the final checkpoint: no step is trained
    # again, the same adapter is published, and the evaluation that still fails is only a note.
    monkeypatch.setattr(huggingface_hub, "HfApi", WorkingHub)
    second = run(config)
    assert second.exit_code == 0, second.result.message
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (result["outcome"], result["reason"]) == ("Succeeded", "Succeeded")
    assert result["metrics"]["steps"] == result["metrics"]["resumed_from_step"] == 3
    assert result["adapter"]["sha256"] == digest
    assert "not done: evaluation prompts failed" in result["message"]
    (upload,) = UPLOADS
    assert upload["repo_id"] == "my-org/tiny-reverse"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(
        upload["allow_patterns"]
    )
    assert not {"result.json", "metrics.jsonl", "checkpoints"} & set(upload["allow_patterns"])
