"""The frozen base's matmuls in FP8 (``quantization.fp8Matmuls``): Hopper's FP8 tensor cores run
twice bf16's dense peak, and the base's ``x W^T`` and ``g W`` are most of a QLoRA step.

Both operands of each matmul are quantised to e4m3 (``torch.float8_e4m3fn``, largest finite
value 448) with one scale per row, and multiplied by ``torch._scaled_mm`` with row-wise scales
into bf16. Every scale here is a *dequantisation* scale (``amax / 448``): a quantised row times
its scale is the row again, to e4m3's three mantissa bits.

- the weight ``W`` (N, K), dequantised from NF4 to bf16, becomes ``Wq`` (N, K) in e4m3 with a
  scale ``s_n`` per output feature (:func:`quantize_weight`; kept for the run where the memory
  plan has room, else made again every call);
- forward: ``x`` (M, K) → ``xq``, ``sx`` (M, 1); ``out = (xq sx) (Wq s)^T``
  (:func:`base_forward`);
- backward, the input gradient ``dx = g W = (g s) Wq``: the weight's scales folded into ``g``
  before it is quantised (``g' = g * s`` per column, then ``g'q``, ``sg`` per row), so one
  quantisation of the weight serves both directions; ``Wq`` is transposed into the
  column-major operand ``_scaled_mm`` needs (one byte a weight, per backward call, or once for
  the run where the plan keeps the transposed copy too) (:func:`base_input_grad`).

The row quantiser (amax per row, an optional per-column multiplier, the scale, clamp and cast)
is one Triton kernel on CUDA, one program per row; :func:`quantize_rows_reference` computes the
same in plain torch (the CPU's path and the tests' oracle). On the CPU ``_scaled_mm`` takes only
per-tensor scales: :func:`fp8_mm` there computes ``(a_q·a_s)(b_q·b_s)`` in fp32, the same math.
A row of zeros gets scale 1.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

log = logging.getLogger(__name__)

#: e4m3's largest finite value.
FP8_MAX = 448.0
#: ``amax * INV_FP8_MAX`` is the dequantisation scale (a multiplication, done the same way by
#: the kernel and by torch: bitwise the same scales).
INV_FP8_MAX = 1.0 / FP8_MAX
FP8_DTYPE = torch.float8_e4m3fn
#: ``_scaled_mm``'s operands: K and N multiples of 16 (cuBLASLt's FP8 alignment).
ALIGNMENT = 16
#: cuBLASLt's fast FP8 accumulation: on for the forward, off for the input gradient (as
#: torchao's float8 training defaults it: gradients are the smaller, more sensitive values).
FAST_ACCUM_FORWARD = True
FAST_ACCUM_BACKWARD = False
#: Columns a kernel program handles at once (a row of up to 14,336 takes a few passes).
KERNEL_BLOCK = 2048


@dataclass(frozen=True)
class Fp8Weight:
    """A weight (N, K) in e4m3 with its dequantisation scale per row (N,), fp32, and where it is
    kept so, the same e4m3 values transposed ((K, N) row-major: the input gradient's operand,
    else transposed again in every backward call)."""

    data: torch.Tensor
    scale: torch.Tensor
    transposed: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        extra = self.transposed.nbytes if self.transposed is not None else 0
        return int(self.data.nbytes + self.scale.nbytes + extra)

    def with_transposed(self) -> Fp8Weight:
        """This weight with its transposed copy made once, for the run."""
        return replace(self, transposed=self.transposed_operand())

    def transposed_operand(self) -> torch.Tensor:
        """The e4m3 values transposed, (K, N) row-major: the kept copy, else made now."""
        return self.transposed if self.transposed is not None else self.data.t().contiguous()


def fits(out_features: int, in_features: int) -> bool:
    """Whether a (out, in) weight can take the FP8 path (``_scaled_mm``'s alignment)."""
    return out_features % ALIGNMENT == 0 and in_features % ALIGNMENT == 0


def available() -> bool:
    """Whether this torch has e4m3 and ``_scaled_mm`` (row-wise scales need torch >= 2.5)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


@functools.cache
def supported_on_this_gpu() -> bool:
    """Whether this node's GPU runs row-wise FP8 ``_scaled_mm``: compute capability 9.0 or newer
    (H100, H200), tried once with a 16 x 16 product (an older torch or driver fails it)."""
    if not (available() and torch.cuda.is_available()):
        return False
    if torch.cuda.get_device_capability() < (9, 0):
        return False
    try:
        a = torch.ones(16, 16, device="cuda").to(FP8_DTYPE)
        scale = torch.ones(16, 1, device="cuda", dtype=torch.float32)
        out = fp8_mm(a, scale, a.t(), scale.view(1, 16), fast_accum=False)
        return bool(out.float().sum().item() == 16 * 16 * 16)
    except (RuntimeError, NotImplementedError) as exc:
        log.warning("no row-wise FP8 matmul on this GPU: %s", str(exc).splitlines()[0])
        return False


# --- the row quantiser ----------------------------------------------------------------------


def scaled_rows_reference(
    rows: torch.Tensor, column_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (M, K) times ``column_scale`` (K,), in fp32, times the reciprocal of each row's
    scale and clamped to e4m3's range (the values the cast rounds), and the scales (M, 1): plain
    torch. The reciprocal (one IEEE division a row) and a product, not a division an element:
    the kernels' rule, within an fp32 rounding of the quotient, and a fraction of its cost."""
    values = rows.float()
    if column_scale is not None:
        values = values * column_scale.float()
    amax = values.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax * INV_FP8_MAX, torch.ones_like(amax))
    return (values * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX), scale


def quantize_rows_reference(
    rows: torch.Tensor, column_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (M, K) quantised to e4m3 per row (after ``column_scale`` (K,) multiplies each
    column), and the dequantisation scales (M, 1) fp32: plain torch."""
    values, scale = scaled_rows_reference(rows, column_scale)
    return values.to(FP8_DTYPE), scale


@functools.cache
def _kernel() -> Any:
    """The Triton row quantiser, compiled on first use (the interpreter runs it on a CPU when
    ``TRITON_INTERPRET=1``)."""
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def quantize_rows_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0917
        # No annotations: Triton resolves them as globals of the kernel (``Any`` is none).
        rows_ptr,
        column_scale_ptr,
        out_ptr,
        scale_ptr,
        row_stride,
        out_stride,
        COLUMNS: tl.constexpr,
        HAS_COLUMN_SCALE: tl.constexpr,
        INV_MAX: tl.constexpr,
        MAX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        source = rows_ptr + row * row_stride
        target = out_ptr + row * out_stride
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, COLUMNS, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            inside = columns < COLUMNS
            values = tl.load(source + columns, mask=inside, other=0.0).to(tl.float32)
            if HAS_COLUMN_SCALE:
                values = values * tl.load(column_scale_ptr + columns, mask=inside, other=0.0)
            amax = tl.maximum(amax, tl.abs(values))
        largest = tl.max(amax, axis=0)
        scale = tl.where(largest > 0, largest * INV_MAX, 1.0)
        tl.store(scale_ptr + row, scale)
        # IEEE division once a row, as torch's ``reciprocal`` (Triton's ``/`` is an approximate
        # one in fp32), then a product an element.
        inverse = tl.math.div_rn(1.0, scale)
        for start in range(0, COLUMNS, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            inside = columns < COLUMNS
            values = tl.load(source + columns, mask=inside, other=0.0).to(tl.float32)
            if HAS_COLUMN_SCALE:
                values = values * tl.load(column_scale_ptr + columns, mask=inside, other=0.0)
            scaled = tl.minimum(tl.maximum(values * inverse, -MAX), MAX)
            tl.store(target + columns, scaled.to(out_ptr.dtype.element_ty), mask=inside)

    return quantize_rows_kernel


def quantize_rows_triton(
    rows: torch.Tensor,
    column_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_reference` as one Triton kernel (one program a row). ``out_dtype``
    float32 returns the values before the cast (the CPU interpreter's own e4m3 cast mis-rounds
    values that round up to a power of two, so its test compares them before the cast)."""
    rows = rows.contiguous()
    count, columns = rows.shape
    out = torch.empty((count, columns), device=rows.device, dtype=out_dtype)
    scale = torch.empty((count, 1), device=rows.device, dtype=torch.float32)
    if count == 0:
        return out, scale
    has_column_scale = column_scale is not None
    column = column_scale.float().contiguous() if column_scale is not None else scale
    block = min(KERNEL_BLOCK, 1 << max(columns - 1, 1).bit_length())
    _kernel()[(count,)](
        rows,
        column,
        out,
        scale,
        rows.stride(0),
        out.stride(0),
        COLUMNS=columns,
        HAS_COLUMN_SCALE=has_column_scale,
        INV_MAX=INV_FP8_MAX,
        MAX=FP8_MAX,
        BLOCK=block,
        num_warps=8 if block >= 1024 else 4,
    )
    return out, scale


@functools.cache
def triton_importable() -> bool:
    """Whether Triton can be imported here (the kernels' CUDA path)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def quantize_rows(
    rows: torch.Tensor, column_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (M, K) in e4m3 per row and their dequantisation scales (M, 1): the Triton kernel
    on CUDA, plain torch elsewhere."""
    if rows.is_cuda and triton_importable():
        return quantize_rows_triton(rows, column_scale)
    return quantize_rows_reference(rows, column_scale)


# --- the matmuls ----------------------------------------------------------------------------


def fp8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    fast_accum: bool,
) -> torch.Tensor:
    """``(a · a_scale) @ (b · b_scale)`` in bf16, for e4m3 ``a`` (M, K) row-major with scales
    (M, 1) and ``b`` (K, N) column-major with scales (1, N): ``_scaled_mm`` on CUDA; on the CPU
    (per-tensor scales only there) the same product in fp32."""
    if a.is_cuda:
        return torch._scaled_mm(
            a,
            b,
            scale_a=a_scale,
            scale_b=b_scale,
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
    return ((a.float() * a_scale) @ (b.float() * b_scale)).to(torch.bfloat16)


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """A bf16 weight (N, K) in e4m3 with a scale per output feature."""
    data, scale = quantize_rows(weight)
    return Fp8Weight(data=data, scale=scale.view(-1))


#: The last input :func:`base_forward` quantised, with its e4m3 rows and scales: q, k and v (and
#: gate and up) read the same input, quantised once for them all. The input itself is held, so
#: its memory can't be reused by another tensor while it is remembered.
_last_input: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []


def _quantized_input(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` quantised per row, reusing the last input's where ``rows`` is the same memory,
    shape and strides, unchanged since (the version counter it had then)."""
    if _last_input:
        last, version, quantized, scale = _last_input[0]
        if (
            last.data_ptr() == rows.data_ptr()
            and last.shape == rows.shape
            and last.stride() == rows.stride()
            and last.dtype == rows.dtype
            and last.device == rows.device
            and version == rows._version
        ):
            return quantized, scale
    quantized, scale = quantize_rows(rows)
    _last_input[:] = [(rows, rows._version, quantized, scale)]
    return quantized, scale


def forget_last_input() -> None:
    """Drop the remembered input (after a step: its memory is the activations')."""
    _last_input.clear()


def base_forward(rows: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """``rows W^T`` (M, N) in bf16 through FP8: ``rows`` (M, K) quantised per row (once for
    every layer that reads the same input)."""
    quantized, scale = _quantized_input(rows)
    return fp8_mm(
        quantized,
        scale,
        weight.data.t(),
        weight.scale.view(1, -1),
        fast_accum=FAST_ACCUM_FORWARD,
    )


@functools.cache
def _ones(columns: int, device: torch.device) -> torch.Tensor:
    """The unit scales (1, K) of the input gradient's weight operand: made once per shape."""
    return torch.ones((1, columns), device=device, dtype=torch.float32)


def base_input_grad(grad: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """``grad W`` (M, K) in bf16 through FP8, for the output gradient ``grad`` (M, N): the
    weight's row scales multiply ``grad``'s columns before it is quantised per row, so the
    e4m3 weight itself is the other operand (transposed into column-major here)."""
    quantized, scale = quantize_rows(grad, weight.scale)
    return input_grad_mm(quantized, scale, weight.transposed_operand())


def input_grad_mm(
    quantized: torch.Tensor, scale: torch.Tensor, transposed: torch.Tensor
) -> torch.Tensor:
    """The input gradient's FP8 matmul: output-gradient rows ``quantized`` (M, N) with their
    ``scale`` (M, 1), the weights' row scales already folded in, times the e4m3 weight whose
    transpose ``transposed`` (K, N) row-major is (its transpose is the (N, K) column-major
    operand ``_scaled_mm`` takes); (M, K) in bf16."""
    return fp8_mm(
        quantized,
        scale,
        transposed.t(),
        _ones(transposed.shape[0], transposed.device),
        fast_accum=FAST_ACCUM_BACKWARD,
    )
