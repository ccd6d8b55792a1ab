"""The e4m3 base weight made straight from bitsandbytes' 4-bit codes, for FP8 base matmuls that
make it again in every call (:mod:`~kubetune.trainer.model.fp8_base`; the memory plan keeps no
e4m3 base where it has no room for one).

Dequantising NF4 to bf16, quantising that per row and, for the input gradient, transposing it
reads and writes the weight five times over in bf16 and e4m3. :func:`quantize_4bit_rows` is one
Triton kernel from the codes (two a byte), their fp32 block scales and the row scales kept for
the run to e4m3, in the forward's (N, K) layout or the input gradient's (K, N): the same values,
bit for bit, as bitsandbytes' bf16 dequantisation followed by ``fp8_base.quantize_rows``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from kubetune.trainer.model.fp8_base import FP8_DTYPE, FP8_MAX, Fp8Weight

#: Rows and columns of the tile each program of the 4-bit-to-e4m3 kernel writes, and its warps:
#: (16, 128) with 4 warps, 16 elements a thread, was the fastest of eight tiles for all three 7B
#: shapes and both layouts on an H100 (bench/results/h100-2026-12-06-codes-v3-fp8-matmul.jsonl:
#: 0.07-0.16 ms a weight against 0.09-0.18 for (32, 128), the one measured end to end).
NF4_KERNEL_BLOCK = (16, 128)
NF4_KERNEL_WARPS = 4


@functools.cache
def _nf4_kernel() -> Any:
    """The Triton kernel turning a 4-bit weight's codes straight into e4m3 rows, compiled on
    first use."""
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def nf4_to_e4m3_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0917
        # No annotations: Triton resolves them as globals of the kernel (``Any`` is none).
        packed_ptr,
        absmax_ptr,
        code_ptr,
        row_scale_ptr,
        out_ptr,
        ROWS: tl.constexpr,
        COLUMNS: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        TRANSPOSED: tl.constexpr,
        MAX: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLUMNS: tl.constexpr,
    ):
        # A tile of (BLOCK_ROWS, BLOCK_COLUMNS) elements, read as BLOCK_COLUMNS / 2 bytes a row:
        # two codes a byte, the first element in the high nibble (bitsandbytes' packing).
        # 32-bit offsets (the caller's weight has fewer than 2^31 elements): half the registers.
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        pairs = tl.program_id(1) * (BLOCK_COLUMNS // 2) + tl.arange(0, BLOCK_COLUMNS // 2)
        inside = (rows < ROWS)[:, None] & (pairs < COLUMNS // 2)[None, :]
        offsets = rows[:, None] * (COLUMNS // 2) + pairs[None, :]
        byte = tl.load(packed_ptr + offsets, mask=inside, other=0).to(tl.int32)
        # Both codes of a byte share a block (the block size is even).
        absmax = tl.load(absmax_ptr + (2 * offsets) // BLOCKSIZE, mask=inside, other=0.0)
        scale = tl.load(row_scale_ptr + rows, mask=rows < ROWS, other=1.0)[:, None]
        code = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15)))
        # bitsandbytes' dequantisation: the code times its block's absmax in fp32, rounded to
        # the nearest bf16 (ties to even) by hand: the interpreter's own cast truncates.
        bits = (code * tl.interleave(absmax, absmax)).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        values = bits.to(tl.float32, bitcast=True)
        scaled = tl.minimum(tl.maximum(tl.math.div_rn(values, scale), -MAX), MAX)
        columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
        if TRANSPOSED:
            target = out_ptr + columns[None, :] * ROWS + rows[:, None]
        else:
            target = out_ptr + rows[:, None] * COLUMNS + columns[None, :]
        stored = (rows < ROWS)[:, None] & (columns < COLUMNS)[None, :]
        tl.store(target, scaled.to(out_ptr.dtype.element_ty), mask=stored)

    return nf4_to_e4m3_kernel


@dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight as the kernel reads it: the codes two a byte (the flattened
    (N, K) weight), each block's absmax in fp32, the 16-value code book, the block size and
    (N, K)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    code_book: torch.Tensor
    blocksize: int
    shape: tuple[int, int]


def kernel_takes(rows: int, columns: int) -> bool:
    """Whether :func:`quantize_4bit_rows` takes a (rows, columns) weight: rows of whole bytes,
    and 32-bit offsets (fewer than 2^31 elements: a 70B base's largest layer has 235 million)."""
    return columns % 2 == 0 and rows * columns < 2**31


def quantize_4bit_rows(
    weight: Packed4bit,
    row_scale: torch.Tensor,
    *,
    transposed: bool,
    out_dtype: torch.dtype = FP8_DTYPE,
    block: tuple[int, int] = NF4_KERNEL_BLOCK,
    num_warps: int = NF4_KERNEL_WARPS,
) -> torch.Tensor:
    """A 4-bit weight's rows (N, K) in e4m3 with the row scales (N,) kept for the run, in one
    Triton kernel: the values bitsandbytes' bf16 dequantisation and ``fp8_base.quantize_rows``
    give, without the bf16 copy in between; ``transposed`` writes them (K, N) row-major, the
    input gradient's operand, without a transpose after. ``out_dtype`` float32: the values
    before the cast (the CPU interpreter's test, as ``fp8_base.quantize_rows_triton``'s)."""
    rows, columns = weight.shape
    if not kernel_takes(rows, columns):
        raise ValueError(f"the 4-bit kernel takes no {rows} x {columns} weight")
    out = torch.empty(
        (columns, rows) if transposed else (rows, columns),
        device=weight.codes.device,
        dtype=out_dtype,
    )
    block_rows, block_columns = block
    grid = (-(-rows // block_rows), -(-columns // block_columns))
    _nf4_kernel()[grid](
        weight.codes.view(torch.uint8),
        weight.absmax,
        weight.code_book,
        row_scale,
        out,
        ROWS=rows,
        COLUMNS=columns,
        BLOCKSIZE=weight.blocksize,
        TRANSPOSED=transposed,
        MAX=FP8_MAX,
        BLOCK_ROWS=block_rows,
        BLOCK_COLUMNS=block_columns,
        num_warps=num_warps,
    )
    return out


@dataclass(frozen=True)
class Fp8FromCodes:
    """A 4-bit weight whose e4m3 copy is made again in every call, straight from its codes
    (:func:`quantize_4bit_rows`): what is kept for the run is its row scales (N floats)."""

    packed: Packed4bit
    scale: torch.Tensor

    def weight(self, *, transposed: bool) -> Fp8Weight:
        """The weight in e4m3 now: (N, K) for the forward, or, ``transposed``, (K, N) row-major
        for the input gradient (``data`` then its (N, K) view)."""
        data = quantize_4bit_rows(self.packed, self.scale, transposed=transposed)
        if transposed:
            return Fp8Weight(data=data.t(), scale=self.scale, transposed=data)
        return Fp8Weight(data=data, scale=self.scale)
