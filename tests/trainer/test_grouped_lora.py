"""Siblings that read one input (q, k, v; gate, up) computed as one function with FP8 base
matmuls: the outputs each sibling alone gives, gradients within e4m3's rounding of the bf16
layers, the kept e4m3 copy held once, and each sibling alone wherever the siblings don't read
one input. Real bitsandbytes NF4 layers on the CPU (the GPU test on CUDA)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from trainer_helpers import forward_backward

pytestmark = pytest.mark.trainer

NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
#: The FP8 block against the bf16 one, relative Frobenius error: one e4m3 product is within
#: 5.1% (tests/trainer/test_fp8_base.py derives it), and the deepest gradients here pass three
#: (q, k, v, then gate and up, then their input gradients): sqrt(3) x 5.1% = 8.8%.
FP8_BLOCK_TOLERANCE = 0.09


def _block(seed: int = 0, device: str = "cpu", one_input: bool = True) -> Any:
    """A Llama-like block: q, k (and v, half as wide: grouped-query heads) on one input, then
    gate and up on another; ``one_input`` False gives k a copy of the input instead."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)

    def layer(inner: int, outer: int) -> Any:
        return bnb.nn.Linear4bit(
            inner, outer, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
        )

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = layer(128, 128), layer(128, 64), layer(128, 64)
            self.gate_proj, self.up_proj = layer(128, 192), layer(128, 192)

        def forward(self, x: Any) -> Any:
            q = self.q_proj(x)
            k = self.k_proj(x if one_input else x.clone())
            v = self.v_proj(x)
            h = x + torch.cat([q[..., :64] * k, v], dim=-1)
            return torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)

    model = Block()
    for name in NAMES:
        linear = getattr(model, name)
        full = torch.randn(linear.out_features, linear.in_features) / linear.in_features**0.5
        linear.weight = bnb.nn.Params4bit(
            full.bfloat16(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )._quantize(device)
    model.is_loaded_in_4bit = True
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(NAMES))
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = (torch.randn_like(param) * 0.1).bfloat16()  # every term counts
    return peft_model.to(device)


def _tokens(count: int, device: str = "cpu") -> Any:
    """``count`` tokens of the block's width (a batch of one row), the same on every run."""
    import torch

    generator = torch.Generator().manual_seed(count)
    return torch.randn(1, count, 128, generator=generator).bfloat16().to(device)


def _prepared(fp8: bool, grouped: bool, keep: str | None = None, **block: Any) -> Any:
    from kubetune.trainer.model import fused_lora, grouped_lora

    model = _block(**block)
    assert fused_lora.fuse_lora_layers(model) == len(NAMES)
    if keep:
        fused_lora.keep_dequantization(model, keep)
    if fp8:
        assert fused_lora.use_fp8_matmuls(model) == len(NAMES)
    if grouped:
        assert grouped_lora.group_siblings(model) == (2 if fp8 else 0)
    return model


def _relative(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


def _grouped_against_alone(device: str, keep: str | None) -> None:
    import torch

    x = _tokens(46, device)  # no multiple of 16
    bf16 = forward_backward(_prepared(fp8=False, grouped=False, device=device), x)
    alone = forward_backward(_prepared(fp8=True, grouped=False, keep=keep, device=device), x)
    grouped = _prepared(fp8=True, grouped=True, keep=keep, device=device)
    block = grouped.base_model.model
    y = x.clone().requires_grad_(True)
    q, k, v = (getattr(block, name)(y) for name in ("q_proj", "k_proj", "v_proj"))
    assert type(q.grad_fn).__name__ == "FusedLoRAGroup4bitBackward"
    assert k.grad_fn is q.grad_fn and v.grad_fn is q.grad_fn  # one node, three outputs
    out, dx, grads = forward_backward(grouped, x)

    # The forward is each sibling's own computation: the same bytes as alone.
    assert torch.equal(out, alone[0])
    # The backward quantises the siblings' output gradients with one scale a row.
    assert not torch.equal(dx, alone[1]), "the grouped backward was not taken"
    assert _relative(dx, bf16[1]) < FP8_BLOCK_TOLERANCE, "input gradients differ"
    assert set(grads) == set(bf16[2]) and len(grads) == 2 * len(NAMES)
    for name, grad in grads.items():
        assert _relative(grad, bf16[2][name]) < FP8_BLOCK_TOLERANCE, f"{name} differs"


@pytest.mark.parametrize(
    "keep", [None, "fp8", "fp8-transposed"], ids=["quantised-per-call", "kept", "kept-transposed"]
)
def test_siblings_as_one_function_give_each_ones_output_and_gradients_within_e4m3s_rounding(
    keep: str | None,
) -> None:
    _grouped_against_alone("cpu", keep)


def test_the_kept_e4m3_siblings_are_one_copy_and_everything_kept_is_dropped() -> None:

    from kubetune.trainer.model import fused_lora

    model = _prepared(fp8=True, grouped=True, keep="fp8-transposed")
    block = model.base_model.model
    group = vars(block.q_proj)[fused_lora.GROUP]
    assert [layer is getattr(block, n) for layer, n in zip(group.layers, NAMES, strict=False)]
    joint = group.kept
    assert joint.data.shape == (256, 128) and joint.transposed.shape == (128, 256)
    start = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        kept = getattr(getattr(block, name).base_layer.weight, fused_lora.FP8_WEIGHT)
        assert kept.data.data_ptr() == joint.data[start:].data_ptr()  # a view, not a copy
        assert kept.transposed is None
        start += kept.data.shape[0]
    forward_backward(model, _tokens(16))
    fused_lora.drop_kept_dequantization(model)
    assert not any(fused_lora.GROUP in vars(module) for module in model.modules())
    assert not hasattr(block.q_proj.base_layer.weight, fused_lora.FP8_WEIGHT)
    assert "_kubetune" not in " ".join(model.state_dict())


def test_siblings_not_called_on_one_input_are_computed_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """k reads a copy of q's input: the first step computes q, k and v together once (k's held
    output unused, k alone instead), then that group stops and says so, and q, k and v are each
    computed alone; gate and up, on one input, stay one function. Gradients stay within
    e4m3's rounding of the bf16 layers throughout."""

    x = _tokens(32)
    bf16 = forward_backward(_prepared(fp8=False, grouped=False, one_input=False), x)
    grouped = _prepared(fp8=True, grouped=True, one_input=False)
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer.model.grouped_lora"):
        first = forward_backward(grouped, x)
        assert "not called on one input" not in caplog.text
        grouped.zero_grad()
        later = forward_backward(grouped, x)
    assert "q_proj, k_proj, v_proj are not called on one input" in caplog.text
    for _, dx, grads in (first, later):
        assert _relative(dx, bf16[1]) < FP8_BLOCK_TOLERANCE
        assert all(_relative(g, bf16[2][n]) < FP8_BLOCK_TOLERANCE for n, g in grads.items())
    block = grouped.base_model.model
    y = x.clone().requires_grad_(True)
    nodes = {name: type(getattr(block, name)(y).grad_fn).__name__ for name in NAMES}
    assert nodes == {
        "q_proj": "FusedLoRA4bitBackward",
        "k_proj": "FusedLoRA4bitBackward",
        "v_proj": "FusedLoRA4bitBackward",
        "gate_proj": "FusedLoRAGroup4bitBackward",
        "up_proj": "FusedLoRAGroup4bitBackward",
    }


def test_siblings_as_one_function_under_activation_checkpointing_give_the_same_gradients() -> None:
    """The block checkpointed as the trainer's plan checkpoints layers (non-reentrant: the
    forward saves nothing, the backward computes q, k and v again on the recomputed input) gives
    the gradients the uncheckpointed grouped block gives, bit for bit."""
    import torch
    from torch.utils.checkpoint import checkpoint

    x = _tokens(40)
    plain = forward_backward(_prepared(fp8=True, grouped=True), x)
    model = _prepared(fp8=True, grouped=True)

    class Checkpointed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, tokens: Any) -> Any:
            return checkpoint(self.inner, tokens, use_reentrant=False)

    out, dx, grads = forward_backward(Checkpointed(), x)
    assert torch.equal(out, plain[0]) and torch.equal(dx, plain[1])
    assert {n.removeprefix("inner."): g for n, g in grads.items()}.keys() == plain[2].keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain[2][name.removeprefix("inner.")]), f"{name} differs"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "keep", [None, "fp8", "fp8-transposed"], ids=["quantised-per-call", "kept", "kept-transposed"]
)
def test_siblings_as_one_function_on_cuda_stay_within_e4m3s_rounding(keep: str | None) -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    if not fp8_base.supported_on_this_gpu():
        pytest.skip(f"{torch.cuda.get_device_name()} runs no row-wise FP8 matmul (needs sm90+)")
    _grouped_against_alone("cuda", keep)
