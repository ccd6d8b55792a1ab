"""The FP8 pieces of the base matmuls (``kubetune.trainer.model.fp8_base``): the row quantiser
against a float64 reference, its Triton kernel against the torch path (under Triton's
interpreter on the CPU, on the GPU for real), and the FP8 matmuls against fp32 products within
what e4m3's rounding allows.

The tolerance, derived: e4m3 keeps 3 mantissa bits, so rounding to nearest moves an element by
at most 2^-4 of its magnitude (6.25%); spread over a binade, the root-mean-square relative error
is at most 2^-4/sqrt(3) = 3.6% an operand. A product whose two operands are rounded
independently is off by at most sqrt(2) x 3.6% = 5.1% in relative Frobenius norm: the bound
here is 6%.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

#: A product of two e4m3-rounded operands, relative Frobenius error (module docstring).
FP8_PRODUCT_TOLERANCE = 0.06


def _relative(result: Any, reference: Any) -> float:
    return float((result.double() - reference).norm() / reference.norm())


def _rows(count: int, columns: int, seed: int = 0) -> Any:
    """bf16 rows of very different magnitudes, one of them all zeros."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, columns, generator=generator)
    rows *= torch.logspace(-3, 3, count).unsqueeze(1)
    rows[1] = 0
    return rows.bfloat16()


@pytest.mark.parametrize("with_column_scale", [False, True])
def test_the_row_quantiser_rounds_each_row_to_e4m3_within_half_a_step(
    with_column_scale: bool,
) -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    rows = _rows(8, 300)
    columns = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.5
    column_scale = columns if with_column_scale else None
    quantized, scale = fp8_base.quantize_rows(rows, column_scale)

    values = rows.double() * (columns.double() if with_column_scale else 1.0)
    amax = values.abs().amax(dim=1, keepdim=True)
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert scale[1].item() == 1.0 and not quantized[1].float().any()  # a row of zeros
    nonzero = amax.squeeze(1) > 0
    assert torch.allclose(scale.double()[nonzero], amax[nonzero] / 448.0, rtol=1e-6, atol=0)
    # Each row's largest element lands on e4m3's largest value.
    assert torch.equal(quantized.float().abs().amax(dim=1)[nonzero], torch.full((7,), 448.0))
    restored = quantized.double() * scale.double()
    # Half a step: 2^-4 of the value for normal e4m3 numbers, 2^-10 of the scale below 2^-6.
    allowed = torch.maximum(values.abs() * 2**-4, scale.double() * 2**-10) * (1 + 1e-9)
    assert bool(((restored - values).abs() <= allowed).all())


def test_the_fp8_matmuls_stay_within_e4m3s_rounding_of_the_fp32_products() -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 256, generator=generator).bfloat16()
    rows[5] = 0
    weight = (torch.randn(96, 256, generator=generator) / 16).bfloat16()
    grad = (torch.randn(64, 96, generator=generator) * 1e-3).bfloat16()
    fp8 = fp8_base.quantize_weight(weight)
    assert fp8.data.shape == (96, 256) and fp8.scale.shape == (96,)
    assert fp8.nbytes == 96 * 256 + 96 * 4

    out = fp8_base.base_forward(rows, fp8)
    dx = fp8_base.base_input_grad(grad, fp8)

    assert out.dtype == dx.dtype == torch.bfloat16
    assert out.shape == (64, 96) and dx.shape == (64, 256)
    assert _relative(out, rows.double() @ weight.double().t()) < FP8_PRODUCT_TOLERANCE
    assert _relative(dx, grad.double() @ weight.double()) < FP8_PRODUCT_TOLERANCE
    assert not out[5].float().any()  # a row of zeros in, a row of zeros out


def test_fp8_mm_on_the_cpu_is_the_product_of_the_dequantised_operands() -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    a, a_scale = fp8_base.quantize_rows(_rows(16, 64))
    b, b_scale = fp8_base.quantize_rows(_rows(32, 64, seed=2))
    product = fp8_base.fp8_mm(a, a_scale, b.t(), b_scale.view(1, -1), fast_accum=False)
    expected = (a.double() * a_scale.double()) @ (b.double() * b_scale.double()).t()
    assert product.dtype == torch.bfloat16
    # bf16's own rounding of the result (half a step: 2^-8 of it) is all that is left.
    assert _relative(product, expected) < 2**-8


def test_only_sizes_that_are_multiples_of_16_take_the_fp8_path() -> None:
    from kubetune.trainer.model import fp8_base

    assert fp8_base.fits(4096, 11008) and fp8_base.fits(192, 128)
    assert not fp8_base.fits(4096, 100) and not fp8_base.fits(8, 4096)


def test_no_gpu_runs_fp8_here() -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/trainer/test_fp8_base.py's gpu tests apply")
    assert fp8_base.supported_on_this_gpu() is False


_INTERPRETED = """
import json, sys, torch
from kubetune.trainer.model import fp8_base
out = {}
rows = torch.load(sys.argv[1])
columns = torch.load(sys.argv[2])
for name, column_scale in (("plain", None), ("scaled", columns)):
    values, scale = fp8_base.quantize_rows_triton(rows, column_scale, out_dtype=torch.float32)
    expected, expected_scale = fp8_base.scaled_rows_reference(rows, column_scale)
    out[name] = {"values": torch.equal(values, expected), "scales": torch.equal(scale, expected_scale)}
print(json.dumps(out))
"""


def _interpreted(script: str, *args: str) -> Any:
    """``script`` run with ``args`` in a Python process of its own under Triton's interpreter
    (``TRITON_INTERPRET=1``: read when a kernel is built); the JSON of its last line."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("columns", [300, 5000])
def test_the_triton_quantiser_computes_the_torch_paths_values_under_the_interpreter(
    columns: int, tmp_path: Path
) -> None:
    """Triton's interpreter runs the kernel on the CPU (``TRITON_INTERPRET=1``, in a process of
    its own: the setting is read when the kernel is built). Its own e4m3 cast mis-rounds values
    that round up to a power of two (127.65 became 64), so the kernel writes its values before
    the cast here, in fp32; the GPU test compares the real e4m3 output. 5,000 columns take
    three passes of the kernel's 2,048-column block."""
    pytest.importorskip("triton")
    import torch

    rows, scales = tmp_path / "rows.pt", tmp_path / "columns.pt"
    torch.save(_rows(6, columns), rows)
    torch.save(torch.rand(columns) + 0.5, scales)
    result = _interpreted(_INTERPRETED, str(rows), str(scales))
    assert result == {name: {"values": True, "scales": True} for name in ("plain", "scaled")}


_FROM_CODES = """
import json, sys, torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from kubetune.trainer.model import fp8_base, fp8_codes
from kubetune.trainer.model.fused_lora import _scales
out = []
for rows, columns, nested in json.loads(sys.argv[1]):
    weight = torch.load(sys.argv[2])[:rows, :columns].contiguous()
    codes, state = quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=nested)
    values, scale = fp8_base.scaled_rows_reference(dequantize_4bit(codes, state).bfloat16())
    holder = type("Weight", (), {"quant_state": state, "data": codes})()
    absmax = _scales(holder) if nested else state.absmax
    packed = fp8_codes.Packed4bit(codes, absmax, state.code.float(), 64, (rows, columns))
    want = values.to(fp8_base.FP8_DTYPE).view(torch.uint8)
    for transposed in (False, True):
        made = fp8_codes.quantize_4bit_rows(packed, scale.view(-1), transposed=transposed)
        out.append(torch.equal(made.view(torch.uint8), want.t() if transposed else want))
# Block scales over six orders of magnitude: e4m3's subnormals, zeros and ties, signs.
generator = torch.Generator().manual_seed(7)
rows, columns = 64, 256
codes = torch.randint(0, 256, (rows * columns // 2,), dtype=torch.uint8, generator=generator)
absmax = 10 ** (-6 * torch.rand(rows * columns // 64, generator=generator))
book = state.code.float()
nibbles = torch.stack([codes >> 4, codes & 15], dim=1).view(rows, columns).long()
dequantised = (book[nibbles] * absmax.repeat_interleave(64).view(rows, columns)).bfloat16()
values, scale = fp8_base.scaled_rows_reference(dequantised)
want = values.to(fp8_base.FP8_DTYPE).view(torch.uint8)
packed = fp8_codes.Packed4bit(codes, absmax, book, 64, (rows, columns))
for transposed in (False, True):
    made = fp8_codes.quantize_4bit_rows(packed, scale.view(-1), transposed=transposed)
    out.append(torch.equal(made.view(torch.uint8), want.t() if transposed else want))
# The check a run makes once per weight before it uses the kernel: one byte off fails it.
checked = fp8_codes.Fp8FromCodes(packed=packed, scale=scale.view(-1))
expected = values.to(fp8_base.FP8_DTYPE)
out.append(checked.writes(expected))
expected.view(torch.uint8)[5, 7] ^= 1
out.append(not checked.writes(expected))
print(json.dumps(out))
"""


def test_the_4bit_to_e4m3_kernel_computes_dequantising_then_quantising_under_the_interpreter(
    tmp_path: Path,
) -> None:
    """One kernel from the 4-bit codes to e4m3 rows, forward's (N, K) and the input gradient's
    (K, N) layout, writes the bytes bitsandbytes' bf16 dequantisation and the row quantiser
    give (the interpreter's kernel rounds to bf16 and e4m3 by hand, the GPU's casts elsewhere):
    double-quantised block scales and plain ones, blocks that straddle tiles, and block scales
    six orders of magnitude apart (e4m3's subnormals and zeros); and the check a run makes once
    per weight before it uses the kernel holds, and fails for one byte off. Sizes are multiples of the block size (every model's: the CPU's own 4-bit
    dequantisation places blocks per row, the GPU's over the flattened weight)."""
    pytest.importorskip("triton")
    import torch

    weight = tmp_path / "weight.pt"
    torch.save(_rows(96, 320, seed=3), weight)
    cases = [[96, 320, True], [80, 192, False], [16, 64, True]]
    checks = 2 * (len(cases) + 1) + 2
    assert _interpreted(_FROM_CODES, json.dumps(cases), str(weight)) == [True] * checks


# --- on the GPU ------------------------------------------------------------------------------


def _cuda_with_fp8() -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    if not fp8_base.supported_on_this_gpu():
        pytest.skip(f"{torch.cuda.get_device_name()} runs no row-wise FP8 matmul (needs sm90+)")


@pytest.mark.gpu
@pytest.mark.parametrize("columns", [4096, 11008, 14336, 300])
@pytest.mark.parametrize("with_column_scale", [False, True])
def test_the_triton_quantiser_on_the_gpu_is_bitwise_the_torch_path(
    columns: int, with_column_scale: bool
) -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    _cuda_with_fp8()
    rows = _rows(64, columns).cuda()
    column_scale = (torch.rand(columns) + 0.5).cuda() if with_column_scale else None
    quantized, scale = fp8_base.quantize_rows(rows, column_scale)
    expected, expected_scale = fp8_base.quantize_rows_reference(rows, column_scale)
    assert torch.equal(scale, expected_scale)
    differ = int((quantized.view(torch.uint8) != expected.view(torch.uint8)).sum())
    assert differ == 0, f"{differ} of {quantized.numel()} elements differ"


@pytest.mark.gpu
def test_scaled_mm_on_the_gpu_matches_the_cpus_emulation() -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    _cuda_with_fp8()
    generator = torch.Generator().manual_seed(0)
    # 1,000 tokens: a count that is no multiple of 16.
    rows = torch.randn(1000, 4096, generator=generator).bfloat16()
    weight = (torch.randn(11008, 4096, generator=generator) / 64).bfloat16()
    grad = (torch.randn(1000, 11008, generator=generator) * 1e-3).bfloat16()
    on_cpu = fp8_base.quantize_weight(weight)
    on_gpu = fp8_base.Fp8Weight(on_cpu.data.cuda(), on_cpu.scale.cuda())
    for name, cpu, gpu in (
        ("forward", fp8_base.base_forward(rows, on_cpu),
         fp8_base.base_forward(rows.cuda(), on_gpu)),
        ("input gradient", fp8_base.base_input_grad(grad, on_cpu),
         fp8_base.base_input_grad(grad.cuda(), on_gpu)),
    ):  # fmt: skip
        # Same operands; only the accumulation order and FP8 fast accumulation differ.
        assert _relative(gpu.cpu(), cpu.double()) < 1e-2, name
    exact = rows.double() @ weight.double().t()
    assert _relative(fp8_base.base_forward(rows.cuda(), on_gpu).cpu(), exact) < (
        FP8_PRODUCT_TOLERANCE
    )


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(11008, 4096), (4096, 11008), (1024, 14336), (48, 320)])
def test_the_4bit_to_e4m3_kernel_on_the_gpu_is_bitwise_dequantising_then_quantising(
    shape: tuple[int, int],
) -> None:
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from kubetune.trainer.model import fp8_base, fp8_codes
    from kubetune.trainer.model.fused_lora import _scales

    _cuda_with_fp8()
    rows, columns = shape
    weight = (_rows(rows, columns, seed=5).float() / 64).bfloat16().cuda()
    codes, state = quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    expected, scale = fp8_base.quantize_rows(dequantize_4bit(codes, state).bfloat16())
    holder = type("Weight", (), {"quant_state": state, "data": codes})()
    packed = fp8_codes.Packed4bit(
        codes, _scales(holder), state.code.float(), state.blocksize, (rows, columns)
    )
    # The default tile and others the bench sweeps: an earlier version of the kernel wrote
    # wrong bytes in the transposed layout with tiles of 64 rows or more on an H100.
    tiles = [(fp8_codes.NF4_KERNEL_BLOCK, fp8_codes.NF4_KERNEL_WARPS), ((16, 128), 4)]
    tiles += [((64, 128), 4), ((128, 128), 8)]
    for (block, warps), transposed in itertools.product(tiles, (False, True)):
        made = fp8_codes.quantize_4bit_rows(
            packed, scale.view(-1), transposed=transposed, block=block, num_warps=warps
        )
        want = expected.t().contiguous() if transposed else expected
        assert made.shape == want.shape and made.is_contiguous()
        differ = int((made.view(torch.uint8) != want.view(torch.uint8)).sum())
        assert differ == 0, f"{block} transposed={transposed}: {differ} of {made.numel()} differ"


def test_layers_reading_the_same_input_quantise_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k and v read the same input: it is quantised once for the three, with the same
    results as three quantisations; a changed input (in place) or another one is quantised
    again, and the backward forgets the remembered input."""
    import torch

    from kubetune.trainer.model import fp8_base

    calls = []
    quantize = fp8_base.quantize_rows
    monkeypatch.setattr(fp8_base, "quantize_rows", lambda rows: calls.append(1) or quantize(rows))
    fp8_base.forget_last_input()
    rows = _rows(8, 64)
    weights = [fp8_base.quantize_weight(_rows(32, 64, seed=seed)) for seed in (1, 2, 3)]
    shared = [fp8_base.base_forward(rows.view(2, 4, 64).reshape(8, 64), w) for w in weights]
    assert len(calls) == 1 + 3  # the three weights' own, then the input once
    fp8_base.forget_last_input()
    alone = []
    for w in weights:
        fp8_base.forget_last_input()
        alone.append(fp8_base.base_forward(rows, w))
    assert all(torch.equal(a, b) for a, b in zip(shared, alone, strict=True))

    calls.clear()
    fp8_base.base_forward(rows, weights[0])  # remembered from the loop above
    rows.mul_(2)  # the same memory, changed
    doubled = fp8_base.base_forward(rows, weights[0])
    fp8_base.base_forward(rows.clone(), weights[0])  # another tensor, the same values
    assert len(calls) == 2
    assert torch.equal(doubled, fp8_base.base_forward(rows.clone(), weights[0]))
    fp8_base.forget_last_input()
    assert not fp8_base._last_input


_SEGMENTS_INTERPRETED = """
import json, sys, torch
from kubetune.trainer.model import fp8_base, fp8_segments
out = []
for widths in json.loads(sys.argv[1]):
    segments = [torch.load(sys.argv[2])[:, :w] * 10.0 ** i for i, w in enumerate(widths)]
    column_scale = torch.rand(sum(widths), generator=torch.Generator().manual_seed(3)) + 0.5
    values, scale = fp8_segments.quantize_segments_triton(segments, column_scale, torch.float32)
    expected, expected_scale = fp8_base.scaled_rows_reference(torch.cat(segments, 1), column_scale)
    out.append(torch.equal(values, expected) and torch.equal(scale, expected_scale))
print(json.dumps(out))
"""


def test_the_segments_kernel_quantises_matrices_side_by_side_as_their_concatenation(
    tmp_path: Path,
) -> None:
    """q, k and v's output gradients (two or three matrices, one a thousand times the other's
    magnitude) quantised in one kernel without concatenating them: the values and the one
    scale a row that the concatenation's quantisation gives, under Triton's interpreter
    (before the e4m3 cast, as the quantiser's interpreter test); 5,000 + 700 columns take
    three passes of the kernel's block."""
    pytest.importorskip("triton")
    import torch

    rows = tmp_path / "rows.pt"
    torch.save(_rows(6, 5000).float(), rows)
    widths = [[300, 200, 100], [5000, 700], [64, 64, 2100]]
    assert _interpreted(_SEGMENTS_INTERPRETED, json.dumps(widths), str(rows)) == [True, True, True]


def test_matrices_side_by_side_on_the_cpu_are_their_concatenation_quantised() -> None:
    import torch

    from kubetune.trainer.model import fp8_base, fp8_segments

    segments = [_rows(8, 64, seed=1), _rows(8, 32, seed=2) * 100]
    column_scale = torch.rand(96) + 0.5
    quantized, scale = fp8_segments.quantize_row_segments(segments, column_scale)
    expected, expected_scale = fp8_base.quantize_rows_reference(
        torch.cat(segments, 1), column_scale
    )
    assert torch.equal(quantized.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("widths", [(4096, 4096, 4096), (4096, 1024, 1024), (11008, 11008)])
def test_the_segments_kernel_on_the_gpu_is_bitwise_the_concatenations_quantisation(
    widths: tuple[int, ...],
) -> None:
    import torch

    from kubetune.trainer.model import fp8_base, fp8_segments

    _cuda_with_fp8()
    segments = [_rows(64, w, seed=i).cuda() * 10.0**i for i, w in enumerate(widths)]
    column_scale = (torch.rand(sum(widths)) + 0.5).cuda()
    quantized, scale = fp8_segments.quantize_row_segments(segments, column_scale)
    expected, expected_scale = fp8_base.quantize_rows_reference(
        torch.cat(segments, 1), column_scale
    )
    assert torch.equal(scale, expected_scale)
    differ = int((quantized.view(torch.uint8) != expected.view(torch.uint8)).sum())
    assert differ == 0, f"{differ} of {quantized.numel()} elements differ"
