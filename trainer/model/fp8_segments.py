"""Matrices side by side quantised as one for FP8 (``fp8_base``'s row quantiser over several
inputs): the output gradients of layers that read one input (q, k, v; gate, up), quantised with
one scale a row over them all so that one FP8 matmul with their weights side by side gives the
sum of their input gradients (:func:`joint_input_grad`, for ``grouped_lora``), without
concatenating them first: the kernel reads each where it lies.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kubetune.trainer.model.fp8_base import (
    FP8_DTYPE,
    FP8_MAX,
    INV_FP8_MAX,
    KERNEL_BLOCK,
    input_grad_mm,
    quantize_rows_reference,
    triton_importable,
)

#: The most matrices :func:`quantize_row_segments` quantises side by side in one kernel (q, k
#: and v's output gradients; gate and up's are two).
MAX_SEGMENTS = 3


@functools.cache
def _segments_kernel() -> Any:
    """The row quantiser over up to three matrices side by side, as if concatenated by columns,
    without the concatenation: each block of the joint row loads every column from the matrix
    it lies in (the others' loads masked off)."""
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def quantize_segments_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0917
        a_ptr,
        b_ptr,
        c_ptr,
        a_stride,
        b_stride,
        c_stride,
        column_scale_ptr,
        out_ptr,
        scale_ptr,
        out_stride,
        COLUMNS_A: tl.constexpr,
        COLUMNS_B: tl.constexpr,
        COLUMNS_C: tl.constexpr,
        TOTAL: tl.constexpr,
        INV_MAX: tl.constexpr,
        MAX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        a = a_ptr + row * a_stride
        b = b_ptr + row * b_stride - COLUMNS_A
        c = c_ptr + row * c_stride - (COLUMNS_A + COLUMNS_B)
        target = out_ptr + row * out_stride
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, TOTAL, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            in_a = columns < COLUMNS_A
            in_c = (columns >= COLUMNS_A + COLUMNS_B) & (columns < TOTAL)
            in_b = (columns >= COLUMNS_A) & (columns < COLUMNS_A + COLUMNS_B)
            values = tl.load(a + columns, mask=in_a, other=0.0).to(tl.float32)
            values += tl.load(b + columns, mask=in_b, other=0.0).to(tl.float32)
            values += tl.load(c + columns, mask=in_c, other=0.0).to(tl.float32)
            values = values * tl.load(column_scale_ptr + columns, mask=columns < TOTAL, other=0.0)
            amax = tl.maximum(amax, tl.abs(values))
        largest = tl.max(amax, axis=0)
        scale = tl.where(largest > 0, largest * INV_MAX, 1.0)
        tl.store(scale_ptr + row, scale)
        inverse = tl.math.div_rn(1.0, scale)
        for start in range(0, TOTAL, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            inside = columns < TOTAL
            in_a = columns < COLUMNS_A
            in_c = (columns >= COLUMNS_A + COLUMNS_B) & inside
            in_b = (columns >= COLUMNS_A) & (columns < COLUMNS_A + COLUMNS_B)
            values = tl.load(a + columns, mask=in_a, other=0.0).to(tl.float32)
            values += tl.load(b + columns, mask=in_b, other=0.0).to(tl.float32)
            values += tl.load(c + columns, mask=in_c, other=0.0).to(tl.float32)
            values = values * tl.load(column_scale_ptr + columns, mask=inside, other=0.0)
            scaled = tl.minimum(tl.maximum(values * inverse, -MAX), MAX)
            tl.store(target + columns, scaled.to(out_ptr.dtype.element_ty), mask=inside)

    return quantize_segments_kernel


def quantize_segments_triton(
    segments: list[torch.Tensor],
    column_scale: torch.Tensor,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_row_segments` as one Triton kernel (one program a row), for two or three
    matrices whose rows are contiguous (``out_dtype`` float32: the values before the cast, as
    :func:`quantize_rows_triton`'s)."""
    if not 1 <= len(segments) <= MAX_SEGMENTS:
        raise ValueError(f"one kernel quantises 1 to {MAX_SEGMENTS} matrices side by side")
    segments = [s if s.stride(-1) == 1 else s.contiguous() for s in segments]
    count = segments[0].shape[0]
    widths = [s.shape[1] for s in segments] + [0] * (MAX_SEGMENTS - len(segments))
    out = torch.empty((count, sum(widths)), device=segments[0].device, dtype=out_dtype)
    scale = torch.empty((count, 1), device=segments[0].device, dtype=torch.float32)
    if count == 0:
        return out, scale
    pointers = segments + [segments[0]] * (MAX_SEGMENTS - len(segments))
    block = min(KERNEL_BLOCK, 1 << max(sum(widths) - 1, 1).bit_length())
    _segments_kernel()[(count,)](
        *pointers,
        *(p.stride(0) for p in pointers),
        column_scale.float().contiguous(),
        out,
        scale,
        out.stride(0),
        COLUMNS_A=widths[0],
        COLUMNS_B=widths[1],
        COLUMNS_C=widths[2],
        TOTAL=sum(widths),
        INV_MAX=INV_FP8_MAX,
        MAX=FP8_MAX,
        BLOCK=block,
        num_warps=8 if block >= 1024 else 4,
    )
    return out, scale


def quantize_row_segments(
    segments: list[torch.Tensor], column_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices (M, K_i) side by side, quantised per row as the one (M, sum K_i) matrix their
    concatenation by columns would be, after ``column_scale`` (sum K_i,) multiplies each column:
    one scale a row over them all, so one FP8 matmul takes them. On CUDA one Triton kernel reads
    each where it lies (up to :data:`MAX_SEGMENTS`); elsewhere the concatenation, then
    :func:`quantize_rows_reference`."""
    if segments[0].is_cuda and len(segments) <= MAX_SEGMENTS and triton_importable():
        return quantize_segments_triton(segments, column_scale)
    return quantize_rows_reference(torch.cat(segments, dim=1), column_scale)


def joint_input_grad(
    grads: list[torch.Tensor], transposed: torch.Tensor, column_scale: torch.Tensor
) -> torch.Tensor:
    """``[g_1 | g_2 | ...] [W_1; W_2; ...]`` (M, K) in bf16 through FP8, for the output
    gradients ``g_i`` (M, N_i) of layers that read one input: quantised as one row
    (:func:`quantize_row_segments`, the weights' row scales ``column_scale`` (sum N_i,) folded
    in), then one matmul with their e4m3 weights side by side, ``transposed`` (K, sum N_i)
    row-major: the sum of their input gradients without adding them."""
    quantized, scale = quantize_row_segments(grads, column_scale)
    return input_grad_mm(quantized, scale, transposed)
