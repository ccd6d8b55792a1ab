"""A real QLoRA run on the tiny model: 4-bit base, falling loss, an adapter that learned the task."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import FAKE_TOKEN, TinyAssets, TrainedRun

pytestmark = pytest.mark.trainer


def _exact_match(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], adapter: bool) -> float:
    import contextlib

    import torch

    hits = 0
    for prompt, expected in pairs:
        inputs = tokenizer(prompt, return_tensors="pt")
        context = contextlib.nullcontext() if adapter else model.disable_adapter()
        with context, torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(
            output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        hits += answer.strip() == expected
    return hits / len(pairs)


def test_base_model_linear_layers_are_bitsandbytes_4bit(tiny: TinyAssets) -> None:
    import bitsandbytes as bnb

    from kubetune.api.models import ModelSpec, QuantizationSpec, TrainingSpec
    from kubetune.trainer.model.modeling import load_quantized_model
    from kubetune.trainer.plan.speed import resolve_speed

    speed = resolve_speed(TrainingSpec(gradient_checkpointing=False), cuda=False)
    model = load_quantized_model(
        str(tiny.model),
        spec=ModelSpec(uri=str(tiny.model)),
        quantization=QuantizationSpec(compute_dtype="float32"),
        speed=speed,
        is_hub=False,
        token=None,
        cuda=False,
    )
    layers = model.model.layers
    projections = [layers[0].self_attn.q_proj, layers[1].mlp.down_proj]
    assert all(isinstance(p, bnb.nn.Linear4bit) for p in projections)
    assert layers[0].self_attn.q_proj.weight.quant_type == "nf4"


def test_a_bf16_runs_residual_stream_stays_bf16_without_ligers_norms(tiny: TinyAssets) -> None:
    """prepare_model_for_kbit_training upcasts every non-4-bit weight to fp32; left so, the
    norms' and embeddings' fp32 outputs would carry the whole run in fp32 (the preference
    trainers run without Liger, whose norm kernel would otherwise cast back)."""
    import dataclasses

    import torch

    from kubetune.api.models import ModelSpec, QuantizationSpec, TrainingSpec
    from kubetune.trainer.model.modeling import load_quantized_model
    from kubetune.trainer.plan.speed import resolve_speed

    speed = resolve_speed(TrainingSpec(gradient_checkpointing=False), cuda=False)
    model = load_quantized_model(
        str(tiny.model),
        spec=ModelSpec(uri=str(tiny.model)),
        quantization=QuantizationSpec(compute_dtype="bfloat16"),
        speed=dataclasses.replace(speed, liger_kernel=False),
        is_hub=False,
        token=None,
        cuda=False,
    )
    seen: dict[str, torch.dtype] = {}

    def layer_output(_module: Any, _inputs: Any, output: Any) -> None:
        seen["layer"] = (output[0] if isinstance(output, tuple) else output).dtype

    def projection_input(_module: Any, inputs: Any, _output: Any) -> None:
        seen["down_proj input"] = inputs[0].dtype

    model.model.layers[-1].register_forward_hook(layer_output)
    model.model.layers[-1].mlp.down_proj.register_forward_hook(projection_input)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert seen == {"layer": torch.bfloat16, "down_proj input": torch.bfloat16}


def test_training_succeeds_and_says_where_the_adapter_is(trained: TrainedRun) -> None:
    assert trained.exit_code == 0, trained.logs[-3000:]
    assert f"adapter: {trained.output}" in trained.stdout
    assert (trained.output / "adapter_model.safetensors").is_file()
    assert (trained.output / "adapter_config.json").is_file()
    assert (trained.output / "tokenizer.json").is_file()


def test_loss_falls_during_training(trained: TrainedRun) -> None:
    lines = (trained.output / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] / 5, losses
    first = json.loads(lines[1])
    assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(first)
    png = (trained.output / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_result_json_records_adapter_digest_base_model_and_fingerprint(
    trained: TrainedRun, tiny: TinyAssets
) -> None:
    result = json.loads((trained.output / "result.json").read_text())
    weights = (trained.output / "adapter_model.safetensors").read_bytes()
    assert result["outcome"] == "Succeeded"
    assert result["adapter"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert result["adapter"]["sizeBytes"] == len(weights)
    assert result["baseModel"] == {"uri": str(tiny.model), "revision": "main"}
    assert result["datasetFingerprint"].startswith("sha256:")
    assert result["metrics"]["steps"] == 300
    assert trained.termination_message["adapter"] == result["adapter"]
    assert trained.termination_message["outcome"] == "Succeeded"


def test_model_card_states_base_model_fingerprint_hyperparameters_and_metrics(
    trained: TrainedRun, tiny: TinyAssets
) -> None:
    card = (trained.output / "README.md").read_text()
    result = json.loads((trained.output / "result.json").read_text())
    assert f'base_model: "{tiny.model}"' in card
    assert result["datasetFingerprint"] in card
    assert "| learning rate | 0.005 |" in card
    assert "final_loss" in card


def test_adapter_loads_with_peft_and_changes_the_output(
    adapted_model: Any, tiny: TinyAssets
) -> None:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    inputs = tokenizer("reverse: a b c =>", return_tensors="pt")
    with torch.no_grad():
        adapted = adapted_model(**inputs).logits
        with adapted_model.disable_adapter():
            base = adapted_model(**inputs).logits
    assert not torch.allclose(adapted, base, atol=1e-3)


def test_adapter_beats_base_on_the_toy_task_by_a_wide_margin(
    adapted_model: Any, tiny: TinyAssets
) -> None:
    from transformers import AutoTokenizer

    from kubetune_devtools.tiny import toy_eval_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    held_out = toy_eval_prompts(24)
    base = _exact_match(adapted_model, tokenizer, held_out, adapter=False)
    adapter = _exact_match(adapted_model, tokenizer, held_out, adapter=True)
    assert adapter >= 0.75, (base, adapter)
    assert adapter - base >= 0.6, (base, adapter)


def test_evaluation_compares_base_and_adapter_answers(trained: TrainedRun) -> None:
    from kubetune_devtools.tiny import toy_eval_prompts

    result = json.loads((trained.output / "result.json").read_text())
    samples = result["evaluation"]["samples"]
    expected = dict(toy_eval_prompts(3))
    assert [s["prompt"] for s in samples] == list(expected)
    assert sum(s["adapter"] == expected[s["prompt"]] for s in samples) >= 2
    assert all(s["base"] != expected[s["prompt"]] for s in samples)


def test_checkpoints_are_written_under_the_output_location(trained: TrainedRun) -> None:
    checkpoints = sorted(p.name for p in (trained.output / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["checkpoint-200", "checkpoint-300"]


def test_hub_token_appears_in_no_log_line_result_or_file(trained: TrainedRun) -> None:
    assert trained.exit_code == 0
    assert FAKE_TOKEN not in trained.logs
    assert FAKE_TOKEN not in trained.stdout
    assert FAKE_TOKEN not in json.dumps(trained.termination_message)
    for path in Path(trained.output).rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
