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
#: (32, 256) with 8 warps was the fastest, or as fast as the fastest, of eight tiles for the 7B
#: shapes in both layouts on an H100 with an earlier version of the kernel
#: (bench/results/h100-2026-12-06-s9-tiles-first.txt); bench/fp8_matmul.py sweeps them.
NF4_KERNEL_BLOCK = (32, 256)
NF4_KERNEL_WARPS = 8


@functools.cache
def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, fixed for the
    process: read once, not in every FP8 call), whose casts to bf16 and e4m3 don't round as the
    GPU's do: the kernel then rounds by hand."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in {"", "0"}


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
        BY_HAND: tl.constexpr,
        MAX: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLUMNS: tl.constexpr,
    ):
        # A tile of BLOCK_COLUMNS / 2 bytes (dim 0) of BLOCK_ROWS rows (dim 1): two codes a byte,
        # the first element in the high nibble (bitsandbytes' packing). The bytes of a row are
        # the tile's first dimension because Triton lays out a gather (the code book's, the
        # block scales') with its first dimension fastest: the loads and the gathers then
        # share one layout, with no exchange through shared memory between them.
        # 32-bit offsets (the caller's weight has fewer than 2^31 elements): half the registers.
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        pairs = tl.program_id(1) * (BLOCK_COLUMNS // 2) + tl.arange(0, BLOCK_COLUMNS // 2)
        inside = (pairs < COLUMNS // 2)[:, None] & (rows < ROWS)[None, :]
        offsets = pairs[:, None] + rows[None, :] * (COLUMNS // 2)
        byte = tl.load(packed_ptr + offsets, mask=inside, other=0).to(tl.int32)
        # Both codes of a byte share a block (the block size is even).
        absmax = tl.load(absmax_ptr + offsets // (BLOCKSIZE // 2), mask=inside, other=0.0)
        # The row quantiser's rule: the values times the reciprocal of the row's scale.
        scale = tl.load(row_scale_ptr + rows, mask=rows < ROWS, other=1.0)
        inverse = tl.math.div_rn(1.0, scale)[None, :]
        # Each byte's two codes in turn (the high nibble first): bitsandbytes' dequantisation
        # (the code times its block's absmax in fp32, rounded to bf16), then the row
        # quantiser's (times the reciprocal, clamped, cast to e4m3), stored as an e4m3 value:
        # no bit casts of e4m3 values nor joins (two versions with them wrote wrong bytes for
        # some tiles on an H100, bench/results/h100-2026-12-06-s9-tiles-first.txt).
        for half in tl.static_range(2):
            values = tl.load(code_ptr + ((byte >> (4 - 4 * half)) & 15)) * absmax
            if BY_HAND:  # the interpreter's cast truncates: to nearest, ties to even, by hand
                bits = values.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                values = bits.to(tl.float32, bitcast=True)
            else:
                values = values.to(tl.bfloat16).to(tl.float32)
            values = tl.minimum(tl.maximum(values * inverse, -MAX), MAX)
            if BY_HAND:
                # The e4m3 byte (``out_ptr`` is bytes here), to nearest, ties to even: the sign,
                # then 3 mantissa bits rounded off fp32's 23 and the exponent's bias 127 made 7;
                # under 2^-6 (e4m3's subnormals, steps of 2^-9) the multiple of 2^-9 rounded by
                # adding and taking away 2^23.
                sign = (values.to(tl.int32, bitcast=True) >> 24) & 0x80
                size = tl.abs(values)
                bits = size.to(tl.int32, bitcast=True)
                normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
                small = ((size * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
                code = (tl.where(size < 0.015625, small, normal) | sign).to(tl.uint8)
            else:
                code = values.to(out_ptr.dtype.element_ty)
            if TRANSPOSED:
                # (K, N) row-major: column 2p + half of the weight is that row of the output.
                target = out_ptr + (2 * pairs + half)[:, None] * ROWS + rows[None, :]
            else:
                target = out_ptr + 2 * offsets + half
            tl.store(target, code, mask=inside)

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
    block: tuple[int, int] = NF4_KERNEL_BLOCK,
    num_warps: int = NF4_KERNEL_WARPS,
) -> torch.Tensor:
    """A 4-bit weight's rows (N, K) in e4m3 with the row scales (N,) kept for the run, in one
    Triton kernel: the bytes bitsandbytes' bf16 dequantisation and ``fp8_base.quantize_rows``
    give, without the bf16 copy in between; ``transposed`` writes them (K, N) row-major, the
    input gradient's operand, without a transpose after. ``block``: the tile (rows, columns)
    each program writes, and ``num_warps`` its warps (the bench sweeps them)."""
    rows, columns = weight.shape
    if not kernel_takes(rows, columns):
        raise ValueError(f"the 4-bit kernel takes no {rows} x {columns} weight")
    out = torch.empty(
        (columns, rows) if transposed else (rows, columns),
        device=weight.codes.device,
        dtype=FP8_DTYPE,
    )
    block_rows, block_columns = block
    by_hand = _interpreted()
    grid = (-(-rows // block_rows), -(-columns // block_columns))
    _nf4_kernel()[grid](
        weight.codes.view(torch.uint8),
        weight.absmax,
        weight.code_book,
        row_scale,
        out.view(torch.uint8) if by_hand else out,
        ROWS=rows,
        COLUMNS=columns,
        BLOCKSIZE=weight.blocksize,
        TRANSPOSED=transposed,
        BY_HAND=by_hand,
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

    def writes(self, expected: torch.Tensor) -> bool:
        """Whether the kernel writes, in both layouts, the e4m3 bytes of ``expected`` (N, K):
        the weight made in two steps (dequantised, then ``fp8_base.quantize_rows``). Checked
        once per weight before a run uses the kernel: Triton compiled versions of it that
        passed on the CPU's interpreter and wrote other bytes on an H100."""
        wanted = expected.view(torch.uint8)
        forward = quantize_4bit_rows(self.packed, self.scale, transposed=False)
        if not torch.equal(forward.view(torch.uint8), wanted):
            return False
        backward = quantize_4bit_rows(self.packed, self.scale, transposed=True)
        return torch.equal(backward.view(torch.uint8), wanted.t())
