"""A memory plan that checkpoints some decoder layers leaves the rest keeping their activations."""

from __future__ import annotations

import pytest
from trainer_helpers import TinyAssets

pytestmark = pytest.mark.trainer


def test_a_partial_plan_leaves_checkpointing_on_for_its_layers_only(tiny: TinyAssets) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from kubetune.trainer.model.modeling import partial_checkpointing_callback

    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": False})  # what the Trainer does first
    partial_checkpointing_callback(1).on_train_begin(None, None, None, model=model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    model(input_ids=model.dummy_inputs["input_ids"]).logits.sum().backward()
