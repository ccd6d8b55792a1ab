"""Smoke test on an NVIDIA GPU: the same trainer path, 4-bit modules on the GPU, loss falls."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from trainer_helpers import TinyAssets, job_manifest

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")


def test_qlora_on_cuda_puts_4bit_modules_on_the_gpu_and_lowers_the_loss(
    tiny: TinyAssets, tmp_path: Path
) -> None:
    import bitsandbytes as bnb

    from kubetune.api.config import TrainerConfig
    from kubetune.api.manifest import load_finetunejob
    from kubetune.trainer.recipe import QLoRASFTRecipe

    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        tmp_path / "out",
        training={
            "maxSteps": 60,
            "checkpointSteps": 30,
            "loggingSteps": 5,
            # The defaults on a GPU: automatic attention, Liger, packing, paged 8-bit AdamW.
            "packing": True,
            "gradientCheckpointing": True,
        },
    )
    manifest["spec"]["quantization"]["computeDtype"] = "bfloat16"
    if os.environ.get("KUBETUNE_GPU_SMOKE_PLAIN"):
        # For telling a broken fast path (flex attention, Liger) from a broken trainer.
        manifest["spec"]["training"].update(attention="sdpa", ligerKernel="off")
    recipe = QLoRASFTRecipe(TrainerConfig(spec=load_finetunejob(manifest).spec))
    recipe.setup()
    assert recipe.speed is not None and recipe.speed.optimizer == "paged_adamw_8bit"
    quantized = [m for m in recipe._trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    assert all(m.weight.device.type == "cuda" for m in quantized)
    outcome = recipe.train()
    published = recipe.save(outcome)
    assert published.result.outcome == "Succeeded", published.result.message
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] / 2, losses
    print(
        f"GPU smoke: {json.dumps({'speed': recipe.speed.__dict__, 'losses': losses})}",
        flush=True,
    )
