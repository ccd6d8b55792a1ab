"""``kubetune-trainer preflight``: the Validating phase's checks and estimate, on the tiny model.

The estimate is held against what the run itself computes: the same config set up by the
recipe (tiny 4-bit model loaded, SFTTrainer built) gives the dataset rows, tokens and optimizer
steps that transformers' Trainer will run; the preflight must give the same numbers without
loading the weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import TinyAssets, job_manifest

from kubetune.api.config import TrainerConfig
from kubetune.trainer.cli import main

pytestmark = pytest.mark.trainer

#: Llama-2-7B's shape, as its config.json gives it (the memory plan and the speed table read it).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
}  # fmt: skip


def config_file(path: Path, manifest: dict[str, Any], **validation: Any) -> Path:
    spec = manifest["spec"]
    spec.pop("evaluation", None)
    if validation:
        spec["validation"] = validation
    document = {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainerConfig", "spec": spec}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def preflight(path: Path, termination_log: Path) -> tuple[int, dict[str, Any]]:
    code = main(["preflight", "--config", str(path)])
    return code, json.loads(termination_log.read_text())


@pytest.mark.parametrize(
    ("fmt", "training"),
    [
        ("prompt-completion", {"epochs": 1, "packing": True, "batchSize": 16}),
        ("messages", {"epochs": 2, "packing": False, "batchSize": 12, "maxLength": 48}),
    ],
    ids=["packed", "padded-two-epochs"],
)
def test_estimate_counts_the_rows_tokens_and_steps_the_run_will_train(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, fmt: str, training: dict[str, Any]
) -> None:
    manifest = job_manifest(tiny.model, tiny.datasets[fmt], tmp_path / "out")
    manifest["spec"]["training"].pop("maxSteps")
    manifest["spec"]["training"].pop("microBatchSize")
    manifest["spec"]["training"].update(training)
    path = config_file(tmp_path / "config.yaml", manifest)

    code, result = preflight(path, termination_log)
    assert code == 0, result
    assert (result["outcome"], result["reason"]) == ("Succeeded", "Validated")
    estimate = result["estimate"]
    assert estimate["examples"] == 512 and estimate["sampled"] is False

    # The run, set up for real from the same config: what it will iterate and for how long.
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    recipe = QLoRASFTRecipe(TrainerConfig.model_validate(yaml.safe_load(path.read_text())))
    recipe.setup()
    trainer = recipe._trainer
    rows = trainer.train_dataset
    steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    assert estimate["sequences"] == len(rows)
    assert estimate["tokens"] == sum(len(ids) for ids in rows["input_ids"])
    assert estimate["steps"] == steps
    assert estimate["plan"]["microBatchSize"] == recipe.plan.micro_batch_size
    if training["packing"]:
        assert estimate["sequences"] < estimate["examples"]


def test_a_malformed_record_fails_the_preflight_naming_its_line(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    lines = tiny.datasets["prompt-completion"].read_text().splitlines()[:4]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([*lines, '{"prompt": "cut off']) + "\n")
    path = config_file(tmp_path / "config.yaml", job_manifest(tiny.model, data, tmp_path / "out"))

    code, result = preflight(path, termination_log)
    assert code == 3
    assert result["reason"] == "DatasetError"
    assert "line 5" in result["message"] and "bad.jsonl" in result["message"]


def weightless_model(tiny: TinyAssets, directory: Path, config: dict[str, Any]) -> Path:
    """The tiny tokenizer beside a big model's config.json, and no weights at all: a preflight
    that tried to load the model would fail."""
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny.model / name).exists():
            shutil.copy(tiny.model / name, directory / name)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_7b_run_on_an_h200_gets_a_plan_peak_and_seconds_without_loading_weights(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    model = weightless_model(tiny, tmp_path / "llama2-7b", LLAMA2_7B)
    manifest = job_manifest(model, tiny.datasets["text"], tmp_path / "out")
    manifest["spec"]["resources"] = {"gpus": 1}
    manifest["spec"]["training"].pop("microBatchSize")
    manifest["spec"]["training"].pop("gradientCheckpointing")
    path = config_file(tmp_path / "config.yaml", manifest, gpuKind="H200")

    code, result = preflight(path, termination_log)
    assert code == 0, result
    estimate = result["estimate"]
    assert estimate["gpuKind"] == "H200"
    assert 4 < estimate["peakGiB"] < 140
    assert estimate["plan"]["gradientCheckpointing"] == "off"  # 64 tokens: plenty of room
    # The measured 7B rate on an H200 is 15,342 real tokens/s (docs/trainer.md); 64-token rows
    # pay the per-micro-step cost of the memory model, so the estimate is slower than that.
    trained = estimate["tokens"] * estimate["steps"] / math.ceil(estimate["sequences"] / 16)
    assert trained / 15_342 < estimate["seconds"] < 20 * trained / 15_342


@pytest.mark.parametrize(
    ("into", "host", "gpu", "seconds"),
    [("original", 13.69, None, 35.1), ("dequantized", 14.27, 15.76, 48.7)],
)
def test_a_7b_merge_is_estimated_as_the_merge_measured_on_a_gpu_machine(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    into: str,
    host: float,
    gpu: float | None,
    seconds: float,
) -> None:
    """output.merge: the estimate says what the merge will write, and the host (and GPU) memory
    and time it takes: for Llama-2-7B's shape, the figures bench/merge_7b.py measured."""
    model = weightless_model(tiny, tmp_path / "llama2-7b", LLAMA2_7B)
    manifest = job_manifest(model, tiny.datasets["text"], tmp_path / "out")
    manifest["spec"]["output"].update(merge=True, mergeBase=into)
    manifest["spec"]["quantization"]["computeDtype"] = "bfloat16"  # the dtype it was measured in
    path = config_file(tmp_path / "config.yaml", manifest)

    code, result = preflight(path, termination_log)
    assert code == 0, result
    merge = result["estimate"]["merge"]
    assert merge["diskGiB"] == pytest.approx(12.55, abs=0.01)  # 6.74 B parameters in bf16
    assert merge["hostGiB"] == pytest.approx(host, abs=0.02)
    assert merge.get("gpuGiB") == (pytest.approx(gpu, abs=0.02) if gpu else None)
    assert merge["seconds"] == pytest.approx(seconds, abs=0.2)
    assert f"the merge writes {merge['diskGiB']} GiB" in result["message"]


def test_no_merge_asked_no_merge_estimated(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    manifest = job_manifest(tiny.model, tiny.datasets["text"], tmp_path / "out")
    code, result = preflight(config_file(tmp_path / "config.yaml", manifest), termination_log)
    assert code == 0, result
    assert "merge" not in result["estimate"]
    assert "merge" not in result["message"]


def test_a_run_that_cannot_fit_the_gpu_kind_fails_naming_the_knob(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    big = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip  # 70B
    model = weightless_model(tiny, tmp_path / "llama2-70b", big)
    manifest = job_manifest(model, tiny.datasets["text"], tmp_path / "out")
    manifest["spec"]["resources"] = {"gpus": 1}
    path = config_file(tmp_path / "config.yaml", manifest, gpuKind="L4")

    code, result = preflight(path, termination_log)
    assert code == 5
    assert result["reason"] == "OutOfMemory"
    assert "training.maxLength" in result["message"] and "GiB" in result["message"]


@pytest.mark.parametrize(
    ("kind", "dropout", "message"),
    [
        ("L4", 0.0, "quantization.fp8Matmuls: on needs a CUDA GPU"),
        ("H100-80GB", 0.05, "quantization.fp8Matmuls: on needs lora.dropout: 0"),
        ("H100-80GB", 0.0, None),
    ],
)
def test_fp8_matmuls_on_where_they_cant_run_fails_naming_the_fields(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    kind: str,
    dropout: float,
    message: str | None,
) -> None:
    manifest = job_manifest(tiny.model, tiny.datasets["text"], tmp_path / "out")
    manifest["spec"]["resources"] = {"gpus": 1}
    manifest["spec"]["quantization"].update(computeDtype="bfloat16", fp8Matmuls="on")
    manifest["spec"].setdefault("lora", {})["dropout"] = dropout
    path = config_file(tmp_path / "config.yaml", manifest, gpuKind=kind)

    exit_code, result = preflight(path, termination_log)
    assert exit_code == (2 if message else 0), result
    if message:
        assert result["reason"] == "InvalidConfig"
        assert message in result["message"]


def test_a_large_dataset_is_tokenized_on_a_sample_and_says_so(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    manifest = job_manifest(tiny.model, tiny.datasets["text"], tmp_path / "out")
    manifest["spec"]["training"].pop("maxSteps")
    manifest["spec"]["training"]["epochs"] = 1
    full_path = config_file(tmp_path / "full.yaml", manifest)
    _, full = preflight(full_path, termination_log)
    sampled_path = config_file(tmp_path / "sampled.yaml", manifest, maxSampleRecords=128)
    code, sampled = preflight(sampled_path, termination_log)

    assert code == 0, sampled
    estimate = sampled["estimate"]
    assert estimate["sampled"] is True and "sample" in sampled["message"]
    assert estimate["examples"] == full["estimate"]["examples"] == 512
    assert estimate["tokens"] == pytest.approx(full["estimate"]["tokens"], rel=0.1)
    assert estimate["steps"] == pytest.approx(full["estimate"]["steps"], abs=1)
