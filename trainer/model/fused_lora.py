"""QLoRA's adapted 4-bit layers as one autograd function each: the base matmul and the LoRA
branch write into one output, so a step runs no full-size elementwise kernel for them.

PEFT's bitsandbytes LoRA layer computes ``clone(base(x)) + lora_B(lora_A(x)) * scaling``: the
output of every adapted layer is copied once, multiplied by the scaling and added (three passes
over a tokens x features tensor), and the backward pass adds the two input gradients and scales
the output gradient the same way. On the 7B benchmark those passes were 14% of a step's GPU time
(docs/performance.md, "Where a step's time goes"). :class:`FusedLoRA4bit` computes the same
function with cuBLAS' ``addmm`` epilogue doing the adds and the scaling folded into the rank-r
side (tokens x 16 elements instead of tokens x 4,096):

- forward: ``out = x W^T``, then ``out += s (x A^T) B^T`` in place;
- backward: ``g_xa = s g B``; ``dA = g_xa^T x``; ``dB = s g^T (x A^T)``; ``dx = g W``, then
  ``dx += g_xa A`` in place.

``W`` is dequantised from NF4 in the forward and again in the backward, as bitsandbytes' own
4-bit matmul does (keeping it would hold a bf16 copy of every layer). Only the plain case is
fused: one active adapter, no dropout, no DoRA or other variant, not merged, gradients on, the
input in the layer's compute dtype; anything else takes PEFT's own forward, unchanged.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


def _dequantized(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, weight.quant_state).to(dtype)  # type: ignore[no-any-return]


class FusedLoRA4bit(torch.autograd.Function):
    """``x W^T + bias + s (x A^T) B^T`` for a frozen 4-bit ``W`` and trainable ``A``, ``B``."""

    @staticmethod
    def forward(  # type: ignore[override]  # noqa: PLR0917 (autograd passes them by position)
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        weight: Any,
        bias: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        out = torch.mm(rows, _dequantized(weight, dtype).t())
        if bias is not None:
            out += bias.to(dtype)
        xa = torch.mm(rows, a.t())
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(rows, xa, a, b)
        ctx.weight, ctx.scaling, ctx.input_shape = weight, scaling, x.shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        rows, xa, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
        scaling = ctx.scaling
        g_xa = torch.mm(g, b).mul_(scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(g_xa.t(), rows).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), xa).mul_(scaling).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, _dequantized(ctx.weight, g.dtype))
            grad_x.addmm_(g_xa, a)
            grad_x = grad_x.view(ctx.input_shape)
        return grad_x, grad_a, grad_b, None, None, None


def _fusable_adapter(
    layer: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """The one adapter of ``layer`` the fused function can compute for this call, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    if not (torch.is_grad_enabled() and layer.training):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.use_dora.get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if getattr(weight, "quant_state", None) is None or getattr(
        weight, "packing_format_for_cpu", False
    ):
        return None
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dtype != base.compute_dtype:
        return None
    return str(name)


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fusable_adapter(layer, x, args, kwargs)
    if name is None:
        return layer.peft_forward(x, *args, **kwargs)  # type: ignore[no-any-return]
    base = layer.get_base_layer()
    return FusedLoRA4bit.apply(  # type: ignore[no-any-return, no-untyped-call]
        x,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        base.weight,
        base.bias,
        float(layer.scaling[name]),
    )


def fuse_lora_layers(model: Any) -> int:
    """Route the forward of every PEFT 4-bit LoRA layer of ``model`` through
    :class:`FusedLoRA4bit` when the call is the plain case (PEFT's own forward otherwise).
    Returns how many layers were routed."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # PEFT without bitsandbytes: nothing is 4-bit
        return 0
    routed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not hasattr(module, "peft_forward"):
            module.peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            routed += 1
    return routed
