"""What the model is trained on, per format: which tokens count in the loss, and packing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TinyAssets, job_manifest

from kubetune.api.config import TrainerConfig
from kubetune.api.manifest import load_finetunejob
from kubetune.trainer.run.recipe import QLoRASFTRecipe

pytestmark = pytest.mark.trainer


def _first_batch(
    tiny: TinyAssets, tmp_path: Path, fmt: str, **overrides: Any
) -> tuple[dict[str, Any], Any]:
    """The first training batch SFTTrainer builds for the toy task in format ``fmt``."""
    training = {"microBatchSize": 4, "batchSize": 4, **overrides.pop("training", {})}
    manifest = job_manifest(
        tiny.model, tiny.datasets[fmt], tmp_path / "out", training=training, **overrides
    )
    recipe = QLoRASFTRecipe(TrainerConfig(spec=load_finetunejob(manifest).spec))
    recipe.setup()
    trainer = recipe._trainer
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, trainer.processing_class


def _trained_text(batch: dict[str, Any], tokenizer: Any, row: int = 0) -> str:
    labels = batch["labels"][row]
    return str(tokenizer.decode(labels[labels != -100]))


def test_prompt_completion_masks_the_prompt(tiny: TinyAssets, tmp_path: Path) -> None:
    batch, tokenizer = _first_batch(tiny, tmp_path, "prompt-completion")
    trained = _trained_text(batch, tokenizer)
    assert "reverse:" not in trained
    assert trained.endswith("<|im_end|>")  # the model learns to stop
    assert len(trained.split()) <= 5


@pytest.mark.parametrize(
    ("fmt", "training", "in_inputs", "untrained"),
    [
        pytest.param(
            "alpaca",
            {"maxLength": 256},
            "### Instruction:",
            "###",
            id="alpaca-masks-the-instruction",
        ),
        pytest.param(
            "messages",
            {},
            "<|im_start|>user",
            "user",
            id="messages-train-on-the-assistant-turn-only",
        ),
    ],
)
def test_the_prompt_is_in_the_inputs_but_not_trained_on(
    tiny: TinyAssets,
    tmp_path: Path,
    fmt: str,
    training: dict[str, Any],
    in_inputs: str,
    untrained: str,
) -> None:
    batch, tokenizer = _first_batch(tiny, tmp_path, fmt, training=training)
    inputs = tokenizer.decode(batch["input_ids"][0])
    assert in_inputs in inputs
    trained = _trained_text(batch, tokenizer)
    assert untrained not in trained and "reverse:" not in trained


def test_text_trains_on_every_token(tiny: TinyAssets, tmp_path: Path) -> None:
    batch, tokenizer = _first_batch(tiny, tmp_path, "text")
    assert "reverse:" in _trained_text(batch, tokenizer)


def test_completion_only_loss_off_trains_on_the_prompt_too(
    tiny: TinyAssets, tmp_path: Path
) -> None:
    batch, tokenizer = _first_batch(
        tiny, tmp_path, "prompt-completion", dataset_extra={"completionOnlyLoss": False}
    )
    assert "reverse:" in _trained_text(batch, tokenizer)


def test_packing_puts_several_examples_in_one_padding_free_row(
    tiny: TinyAssets, tmp_path: Path
) -> None:
    batch, tokenizer = _first_batch(
        tiny, tmp_path, "prompt-completion", training={"packing": True, "maxLength": 64}
    )
    assert batch["input_ids"].shape[0] == 1  # padding-free: the batch is one flat row
    assert tokenizer.pad_token_id not in batch["input_ids"][0].tolist()
    restarts = int((batch["position_ids"][0] == 0).sum())
    assert restarts >= 8  # at least a dozen or so toy examples are packed side by side


@pytest.mark.parametrize("fmt", ["messages", "alpaca"])
def test_each_format_trains_end_to_end_with_packing(
    tiny: TinyAssets, tmp_path: Path, fmt: str
) -> None:
    from kubetune.trainer.run.runner import run

    manifest = job_manifest(
        tiny.model,
        tiny.datasets[fmt],
        tmp_path / "out",
        dataset_extra={"evalFraction": 0.1},
        training={
            "maxSteps": 6,
            "packing": True,
            "maxLength": 256,
            "checkpointSteps": 100,
            "loggingSteps": 2,
        },
    )
    manifest["spec"]["output"]["merge"] = fmt == "alpaca"
    manifest["spec"]["output"]["mergeBase"] = "dequantized"
    outcome = run(TrainerConfig(spec=load_finetunejob(manifest).spec))
    assert outcome.exit_code == 0, outcome.result.message
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert outcome.result.metrics["steps"] == 6
    assert outcome.result.metrics["eval_loss"] > 0  # evalFraction held some records out
    if fmt == "alpaca":
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
        assert not any("lora" in name for name, _ in merged.named_parameters())


def test_push_to_hub_uploads_the_adapter_and_its_description_only(
    tiny: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from kubetune.trainer.run.runner import run

    calls: list[tuple[str, dict[str, Any]]] = []
    uploaded: list[str] = []

    class RecordingHubApi:
        """The hub client, short of the network: it picks the files of the folder to upload
        the way ``HfApi.upload_folder`` does, and records them."""

        def __init__(self, token: str | None = None) -> None:
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id: str, **kwargs: Any) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs: Any) -> None:
            calls.append(("upload_folder", kwargs))
            folder = Path(kwargs["folder_path"])
            files = [p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file()]
            uploaded.extend(
                filter_repo_objects(
                    files,
                    allow_patterns=kwargs.get("allow_patterns"),
                    ignore_patterns=kwargs.get("ignore_patterns"),
                )
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHubApi)
    # As a Secret made with `echo` holds it: the hub gets it stripped.
    monkeypatch.setenv("HF_PUSH_TOKEN", "hf_push_token_for_tests_only\n")
    output = tmp_path / "out"
    manifest = job_manifest(
        tiny.model, tiny.datasets["text"], output, training={"maxSteps": 2, "checkpointSteps": 1}
    )
    manifest["spec"]["output"]["pushToHub"] = {
        "repoId": "my-org/tiny-reverse",
        "tokenSecretRef": {"name": "hub-write"},
    }
    # A merged model beside the adapter: its files have the same names as some of the adapter's.
    manifest["spec"]["output"]["merge"] = True
    outcome = run(TrainerConfig(spec=load_finetunejob(manifest).spec))
    assert outcome.exit_code == 0, outcome.result.message
    assert calls[0] == ("init", {"token": "hf_push_token_for_tests_only"})
    assert calls[1] == (
        "create_repo",
        {"repo_id": "my-org/tiny-reverse", "private": True, "exist_ok": True},
    )
    assert calls[2][1]["folder_path"] == str(output)
    # The output folder holds much more than the adapter...
    written = {p.relative_to(output).as_posix() for p in output.glob("**/*") if p.is_file()}
    assert {"result.json", "metrics.jsonl", "merged/config.json"} <= written
    assert any(name.startswith("checkpoints/checkpoint-2/") for name in written)
    # ...and only the adapter's own files (weights, config, tokenizer) and its description go.
    assert sorted(uploaded) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "loss_curve.png",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
