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
- backward: ``g_xa = s g B``; ``dA = g_xa^T x``; ``dB = s g^T (x A^T)`` (``s`` as the GEMMs'
  alpha); ``dx = g W``, then ``dx += g_xa A`` in place.

``W`` is dequantised from NF4 in the forward and again in the backward, as bitsandbytes' own
4-bit matmul does, but in one kernel rather than three: :func:`keep_dequantization` keeps the
double-quantised block scales in fp32 for the run (the memory plan's default), or, where the
plan has room and its switch is on, the whole bf16 weight (no dequantisation in a step).

With ``quantization.fp8Matmuls`` on (:func:`use_fp8_matmuls`), the two base matmuls, ``x W^T``
and ``g W``, run in FP8 (:mod:`~kubetune.trainer.model.fp8_base`) for every layer whose sizes
are multiples of 16 and whose input is bf16: ``W`` quantised to e4m3 once for the run where the
memory plan keeps it (:func:`keep_dequantization` with ``"fp8"``), else dequantised and
quantised again in each call. The LoRA matmuls, the bias and everything else stay in bf16.

Only the plain case is fused: one active adapter, no dropout, no DoRA or other variant, not
merged, gradients on, the input in the layer's compute dtype; anything else takes PEFT's own
forward, unchanged.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


#: Attribute of a 4-bit weight holding its whole bf16 dequantisation, kept for the run.
KEPT_WEIGHT = "_kubetune_dequantized"
#: Attribute of a double-quantised 4-bit weight holding its block scales already dequantised.
KEPT_ABSMAX = "_kubetune_absmax"
#: Attribute of a 4-bit weight whose base matmuls run in FP8: its e4m3 copy kept for the run
#: (an ``fp8_base.Fp8Weight``), its row scales (an ``fp8_codes.Fp8FromCodes``: the e4m3 copy
#: made from the 4-bit codes in one kernel in every call), or True (dequantised to bf16 and
#: quantised again in every call).
FP8_WEIGHT = "_kubetune_fp8"
#: Attribute of an adapted layer computed with its siblings (q, k, v; gate, up) as one function
#: (a ``grouped_lora.SiblingGroup``).
GROUP = "_kubetune_group"
#: Per-call FP8 weights made straight from the 4-bit codes where the kernel can run (the bench
#: switches it off to measure it against dequantising to bf16, quantising and transposing).
E4M3_FROM_CODES = True


def _dequantized(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``: the copy kept for the run if there is one; else dequantised from
    NF4 now, in one kernel where its block scales are kept (bitsandbytes' own path first
    dequantises the double-quantised scales: two more kernels every call)."""
    kept = getattr(weight, KEPT_WEIGHT, None)
    if kept is not None and kept.dtype == dtype:
        return kept  # type: ignore[no-any-return]
    state = weight.quant_state
    absmax = getattr(weight, KEPT_ABSMAX, None)
    if absmax is not None:
        return torch.ops.bitsandbytes.dequantize_4bit.default(  # type: ignore[no-any-return]
            weight.data, absmax, state.blocksize, state.quant_type, state.shape, dtype
        )
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, state).to(dtype)  # type: ignore[no-any-return]


def _fp8_operand(weight: Any, dtype: torch.dtype, *, transposed: bool = False) -> Any:
    """``weight`` in e4m3 for the FP8 base matmuls (an ``fp8_base.Fp8Weight``): the copy kept
    for the run, else made now (``transposed`` too where it is made straight from the codes,
    for the input gradient); None where this layer's base runs in bf16."""
    fp8 = getattr(weight, FP8_WEIGHT, None)
    if fp8 is None or dtype != torch.bfloat16:
        return None
    if fp8 is True:
        from kubetune.trainer.model.fp8_base import quantize_weight

        with torch.no_grad():
            return quantize_weight(_dequantized(weight, dtype))
    from kubetune.trainer.model.fp8_codes import Fp8FromCodes

    if isinstance(fp8, Fp8FromCodes):
        return fp8.weight(transposed=transposed)
    return fp8


def _from_codes(weight: Any) -> Any:
    """What a per-call FP8 weight keeps for the run: its row scales, with which one kernel makes
    its e4m3 copy straight from the 4-bit codes in each call (``fp8_codes.Fp8FromCodes``), where
    that kernel can run (CUDA with Triton, fp32 block scales at hand, the switch on) and writes,
    checked here once, the bytes of the two steps; else True (dequantised to bf16 and quantised
    in each call)."""
    from kubetune.trainer.model import fp8_base, fp8_codes

    state = weight.quant_state
    absmax = getattr(weight, KEPT_ABSMAX, None)
    if absmax is None and not state.nested:
        absmax = state.absmax
    if not (
        E4M3_FROM_CODES
        and weight.data.is_cuda
        and fp8_base.triton_importable()
        and absmax is not None
        and absmax.dtype == torch.float32
        and fp8_codes.kernel_takes(*(int(size) for size in state.shape))
    ):
        return True
    with torch.no_grad():
        expected, scale = fp8_base.quantize_rows(_dequantized(weight, torch.bfloat16))
        rows, columns = (int(size) for size in state.shape)
        packed = fp8_codes.Packed4bit(
            codes=weight.data,
            absmax=absmax,
            code_book=state.code.to(weight.data.device, torch.float32),
            blocksize=int(state.blocksize),
            shape=(rows, columns),
        )
        made = fp8_codes.Fp8FromCodes(packed=packed, scale=scale.view(-1))
        if made.writes(expected):
            return made
    _warn_kernel_differs(rows, columns)
    return True


@functools.cache
def _warn_kernel_differs(rows: int, columns: int) -> None:
    """Said once per shape: the compiled 4-bit kernel wrote other bytes than the two steps."""
    log.warning(
        "the 4-bit-to-e4m3 kernel wrote other bytes than dequantising then quantising a %d x %d "
        "weight on this GPU: such weights are made in two steps in each call (correct, slower)",
        rows,
        columns,
    )


def _fp8_capable(weight: Any, compute_dtype: torch.dtype) -> bool:
    """Whether a 4-bit weight's base matmuls can run in FP8: bf16 compute, both sizes
    multiples of 16 (``_scaled_mm``'s alignment)."""
    from kubetune.trainer.model.fp8_base import fits

    out_features, in_features = weight.quant_state.shape
    return compute_dtype == torch.bfloat16 and fits(int(out_features), int(in_features))


def use_fp8_matmuls(model: Any) -> int:
    """Run the base matmuls of every fused layer that can in FP8, the weight quantised again in
    each call (:func:`keep_dequantization` with ``"fp8"`` keeps it for the run instead).
    Returns how many layers will."""
    routed = 0
    for weight, base in _fused_weights(model):
        if _fp8_capable(weight, base.compute_dtype):
            if getattr(weight, FP8_WEIGHT, None) is None:
                setattr(weight, FP8_WEIGHT, _from_codes(weight))
            routed += 1
    return routed


def _fused_weights(model: Any) -> list[tuple[Any, Any]]:
    """(4-bit weight, its base layer) of every layer :func:`fuse_lora_layers` routed."""
    found = []
    for module in model.modules():
        if not hasattr(module, "peft_forward"):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            found.append((weight, base))
    return found


def _scales(weight: Any) -> torch.Tensor | None:
    """The fp32 block scales of a double-quantised weight, as bitsandbytes computes them before
    every dequantisation (None: not double-quantised, its scales are fp32 already)."""
    from bitsandbytes.functional import dequantize_blockwise

    state = weight.quant_state
    if not state.nested or weight.data.dim() != 2 or weight.data.shape[0] == 1:
        return None
    absmax = dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()  # type: ignore[no-any-return]


def keep_dequantization(model: Any, what: str) -> int:
    """Keep part of every fused layer's dequantisation for the whole run (the base is frozen, so
    it never changes): ``"scales"`` keeps the double-quantised block scales in fp32 (a 64th of
    the weights' count in fp32, ~0.4 GB for a 7B base), ``"weights"`` the whole weight in the
    compute dtype (two bytes a weight: the NF4 base's memory four times over, no dequantisation
    left in a step), ``"fp8"`` the weight in e4m3 with a scale per row for the FP8 base matmuls
    (one byte a weight and four a row; layers that can't run in FP8 keep nothing),
    ``"fp8-transposed"`` that and its transposed copy (another byte a weight: no transpose in a
    backward call). Returns how
    many weights were kept."""
    kept = 0
    for weight, base in _fused_weights(model):
        if what == "weights":
            with torch.no_grad():
                setattr(weight, KEPT_WEIGHT, _dequantized(weight, base.compute_dtype))
        elif what in ("fp8", "fp8-transposed"):
            if not _fp8_capable(weight, base.compute_dtype):
                continue
            from kubetune.trainer.model.fp8_base import quantize_weight

            with torch.no_grad():
                fp8 = quantize_weight(_dequantized(weight, torch.bfloat16))
                setattr(weight, FP8_WEIGHT, fp8.with_transposed() if what != "fp8" else fp8)
        elif what == "scales":
            scales = _scales(weight)
            if scales is None:
                continue
            setattr(weight, KEPT_ABSMAX, scales)
        else:
            raise ValueError(f"nothing to keep called {what!r}")
        kept += 1
    return kept


def drop_kept_dequantization(model: Any) -> None:
    """Free what :func:`keep_dequantization` kept (after training: evaluation and merging
    dequantise as bitsandbytes does), and the FP8 path's remembered input."""
    from kubetune.trainer.model.fp8_base import forget_last_input

    forget_last_input()
    for module in model.modules():
        if GROUP in vars(module):
            delattr(module, GROUP)
        weight = getattr(module, "weight", None)
        for name in (KEPT_WEIGHT, KEPT_ABSMAX, FP8_WEIGHT):
            if weight is not None and hasattr(weight, name):
                delattr(weight, name)


@functools.cache
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim zero for ``addmm(zero, ..., beta=0)``: made once, not a fill kernel every call."""
    return torch.zeros((), device=device, dtype=dtype)


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
        fp8 = _fp8_operand(weight, dtype)
        if fp8 is not None:
            from kubetune.trainer.model.fp8_base import base_forward

            out = base_forward(rows, fp8)
        else:
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
        # The scaling as the GEMM's alpha (beta 0: the zero is never read), not a pass of its own.
        zero = _zero(g.device, g.dtype)
        g_xa = torch.addmm(zero, g, b, beta=0, alpha=scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(g_xa.t(), rows).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.addmm(zero, g.t(), xa, beta=0, alpha=scaling).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[0]:
            fp8 = _fp8_operand(ctx.weight, g.dtype, transposed=True)
            if fp8 is not None:
                from kubetune.trainer.model.fp8_base import base_input_grad, forget_last_input

                forget_last_input()  # the forward's last input: not read again before the next
                grad_x = base_input_grad(g, fp8)
            else:
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
    group = vars(layer).get(GROUP)
    if group is not None:
        out = group.output(layer, x, name)
        if out is not None:
            return out  # type: ignore[no-any-return]
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


def kept_dequantization_dropped_after_training() -> Any:
    """A callback freeing what :func:`keep_dequantization` kept once training ends."""
    from transformers import TrainerCallback

    class DropKeptDequantization(TrainerCallback):  # type: ignore[misc]
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            drop_kept_dequantization(kwargs["model"])

    return DropKeptDequantization()
