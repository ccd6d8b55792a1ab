"""`kubetune train` as a person runs it on a laptop: the command's flags stand in for the
manifest's cluster-only fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import TinyAssets, job_manifest, write_manifest

from kubetune.trainer.local_run import main as kubetune

pytestmark = pytest.mark.trainer


def test_train_with_output_flag_needs_no_spec_output(tiny: TinyAssets, tmp_path: Path) -> None:
    manifest = job_manifest(
        tiny.model, tiny.datasets["prompt-completion"], "unused", training={"maxSteps": 2}
    )
    del manifest["spec"]["output"]
    path = write_manifest(tmp_path / "job.yaml", manifest)

    assert kubetune(["train", str(path), "--no-progress", "--output", str(tmp_path / "here")]) == 0
    result = json.loads((tmp_path / "here" / "result.json").read_text())
    assert result["outcome"] == "Succeeded"
    assert (tmp_path / "here" / "adapter_model.safetensors").is_file()


def test_train_without_spec_output_or_flag_names_the_missing_field(
    tiny: TinyAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = job_manifest(tiny.model, tiny.datasets["prompt-completion"], "unused")
    del manifest["spec"]["output"]
    path = write_manifest(tmp_path / "job.yaml", manifest)

    assert kubetune(["train", str(path), "--no-progress"]) == 2
    assert "spec.output: required field is missing" in capsys.readouterr().err
