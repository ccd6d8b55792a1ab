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
    from kubetune.trainer.model import fp8_base
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        tmp_path / "out",
        training={
            "maxSteps": 60,
            "checkpointSteps": 30,
            "loggingSteps": 5,
            # The defaults on a GPU (automatic attention, Liger, packing, the memory plan's
            # optimizer), with every layer checkpointed to cover that path too.
            "packing": True,
            "gradientCheckpointing": True,
        },
    )
    manifest["spec"]["quantization"]["computeDtype"] = "bfloat16"
    plain = bool(os.environ.get("KUBETUNE_GPU_SMOKE_PLAIN"))
    if plain:
        # For telling a broken fast path (varlen attention, Liger, FP8) from a broken trainer.
        manifest["spec"]["training"].update(attention="sdpa", ligerKernel="off")
        manifest["spec"]["quantization"]["fp8Matmuls"] = "off"
    # On Hopper the base's matmuls run in FP8, the tiny base kept in e4m3 (it fits): asked for
    # (``auto`` takes FP8 only from 8,192 tokens a micro-step, more than this tiny job's).
    fp8 = fp8_base.supported_on_this_gpu() and not plain
    if fp8:
        manifest["spec"]["quantization"]["fp8Matmuls"] = "on"
    recipe = QLoRASFTRecipe(TrainerConfig(spec=load_finetunejob(manifest).spec))
    recipe.setup()
    assert recipe.speed is not None and recipe.memory is not None
    # A tiny model on a big card: room for the fused AdamW's fp32 states.
    assert recipe.speed.optimizer == "adamw_torch_fused"
    assert recipe.speed.gradient_checkpointing
    assert recipe.speed.checkpointed_layers is None  # all of them
    # Without FP8 the fused layers keep nothing of their dequantisation until a GPU measures the
    # kept scales.
    assert recipe.speed.fp8_matmuls is fp8
    assert recipe.speed.kept_dequantization == ("fp8" if fp8 else "none")
    if not plain:
        # Packed sequences on an Ampere-or-newer GPU: FlashAttention's varlen kernel.
        assert recipe.speed.attention == "varlen"
    quantized = [m for m in recipe._trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    assert all(m.weight.device.type == "cuda" for m in quantized)
    outcome = recipe.train()
    published = recipe.save(outcome)
    assert published.result.outcome == "Succeeded", published.result.message
    plan = published.result.plan
    assert plan is not None and plan.gradient_checkpointing == "all layers"
    assert plan.peak_gib is not None and plan.estimated_peak_gib is not None
    assert plan.fp8_matmuls is fp8
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] / 2, losses
    print(
        f"GPU smoke: {json.dumps({'speed': recipe.speed.__dict__, 'plan': plan.model_dump(), 'losses': losses})}",
        flush=True,
    )


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["same-heads", "grouped-query"])
def test_varlen_attention_keeps_packed_sequences_apart_like_a_block_mask(kv_heads: int) -> None:
    """kubetune's varlen attention on three packed sequences equals SDPA with a block-diagonal
    causal mask, forward and backward, with as many or fewer key/value heads."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from kubetune.trainer.model import varlen_attention

    varlen_attention.register()
    from transformers import AttentionInterface

    attend = AttentionInterface()[varlen_attention.NAME]
    torch.manual_seed(0)
    lengths = [5, 300, 211]
    total, heads, dim = sum(lengths), 4, 64
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(
        1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    v = torch.randn(
        1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    cu = torch.tensor([0, 5, 305, 516], dtype=torch.int32)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    out, _ = attend(module, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu,
                    cu_seq_lens_k=cu, max_length_q=300, max_length_k=300)  # fmt: skip
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).cuda()
    mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, device="cuda").tril().bool()
    reps = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, reps), repeat_kv(v, reps), attn_mask=mask, scale=dim**-0.5
    ).transpose(1, 2)
    assert out.shape == expected.shape == (1, total, heads, dim)
    assert float((out.float() - expected.float()).abs().max()) < 2e-2
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        assert float((got - want).norm() / want.norm()) < 2e-2
