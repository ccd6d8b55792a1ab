"""The FP8 base matmuls' pieces against bf16 at the 7B shapes: time and error of each.

Run on a Hopper GPU (bench/gpu.sh sets up the imports):

    python bench/fp8_matmul.py --out results.jsonl

For each (N, K) of a Llama-2-7B decoder layer's Linear modules and M tokens a micro-step (the
plan's 16,384 by default), one JSON line: the bf16 matmul (``torch.mm``) and the FP8 path of
``kubetune.trainer.model.fp8_base`` for the forward (``x W^T``: the row quantiser on ``x``, then
``_scaled_mm``) and the input gradient (``g W``: the quantiser on ``g`` with the weight's scales
folded in, the e4m3 weight transposed, ``_scaled_mm``), each in milliseconds (CUDA events,
median of ``--iters``), the matmul alone beside the whole path, the weight's own quantisation
(what a call pays where the plan keeps no e4m3 base), TFLOP/s, and each result's error against
an fp32 product: the relative Frobenius norm and the largest element's error over the largest
element. The fast-accumulation variant of the forward is timed too. ``--device cpu`` runs the
same on the CPU's emulation (small ``--tokens``: to try the script, not to time anything).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: (N, K) of the 7B decoder's Linear modules: q/k/v/o, gate/up, down.
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))
#: The 4-bit-to-e4m3 kernel's tiles (rows, columns) and warps timed beside its default.
KERNEL_CONFIGS = (
    (16, 128, 4),
    (32, 64, 4),
    (32, 128, 4),
    (32, 256, 8),
    (64, 64, 4),
    (64, 128, 4),
    (64, 128, 8),
    (128, 128, 8),
)


def timed_ms(fn: Callable[[], Any], iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs after three warm-up runs (CUDA events;
    the wall clock on a CPU)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def errors(result: Any, reference: Any) -> dict[str, float]:
    """The relative Frobenius error and the largest element error over the largest element."""
    diff = result.float() - reference
    return {
        "relative_norm": round(float(diff.norm() / reference.norm()), 5),
        "max_over_max": round(float(diff.abs().max() / reference.abs().max()), 5),
    }


def measure(
    tokens: int, out_features: int, in_features: int, iters: int, device: str = "cuda"
) -> dict[str, Any]:
    import torch

    from kubetune.trainer.model import fp8_base

    torch.manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    weight = (
        torch.randn(out_features, in_features, device=device, dtype=torch.float32)
        / in_features**0.5
    ).bfloat16()
    grad = torch.randn(tokens, out_features, device=device, dtype=torch.bfloat16) * 1e-3
    w8 = fp8_base.quantize_weight(weight)
    xq, sx = fp8_base.quantize_rows(x)
    gq, sg = fp8_base.quantize_rows(grad, w8.scale)
    wt = w8.data.t().contiguous()
    ones = torch.ones((1, in_features), device=device, dtype=torch.float32)
    flops = 2.0 * tokens * out_features * in_features

    def mm_fp8_forward(fast: bool) -> Any:
        return fp8_base.fp8_mm(xq, sx, w8.data.t(), w8.scale.view(1, -1), fast_accum=fast)

    record: dict[str, Any] = {"M": tokens, "N": out_features, "K": in_features}
    ms = {
        "forward_bf16": timed_ms(lambda: torch.mm(x, weight.t()), iters),
        "forward_fp8": timed_ms(lambda: fp8_base.base_forward(x, w8), iters),
        "forward_fp8_mm_only": timed_ms(lambda: mm_fp8_forward(fp8_base.FAST_ACCUM_FORWARD), iters),
        "forward_fp8_mm_only_other_accum": timed_ms(
            lambda: mm_fp8_forward(not fp8_base.FAST_ACCUM_FORWARD), iters
        ),
        "quantize_x": timed_ms(lambda: fp8_base.quantize_rows(x), iters),
        "quantize_x_torch": timed_ms(lambda: fp8_base.quantize_rows_reference(x), iters),
        "input_grad_bf16": timed_ms(lambda: torch.mm(grad, weight), iters),
        "input_grad_fp8": timed_ms(lambda: fp8_base.base_input_grad(grad, w8), iters),
        "input_grad_fp8_mm_only": timed_ms(
            lambda: fp8_base.fp8_mm(gq, sg, wt.t(), ones, fast_accum=fp8_base.FAST_ACCUM_BACKWARD),
            iters,
        ),
        "transpose_weight": timed_ms(lambda: w8.data.t().contiguous(), iters),
        "quantize_weight": timed_ms(lambda: fp8_base.quantize_weight(weight), iters),
    }
    if device == "cuda":
        ms.update(per_call_weight_ms(weight, iters))
    record["ms"] = ms
    record["tflops"] = {
        name: round(flops / (value * 1e-3) / 1e12, 1)
        for name, value in ms.items()
        if name.startswith(("forward", "input_grad"))
    }
    record["speedup"] = {
        "forward": round(ms["forward_bf16"] / ms["forward_fp8"], 3),
        "input_grad": round(ms["input_grad_bf16"] / ms["input_grad_fp8"], 3),
    }
    reference_out = x.float() @ weight.float().t()
    reference_dx = grad.float() @ weight.float()
    record["error_vs_fp32"] = {
        "forward_bf16": errors(torch.mm(x, weight.t()), reference_out),
        "forward_fp8": errors(fp8_base.base_forward(x, w8), reference_out),
        "input_grad_bf16": errors(torch.mm(grad, weight), reference_dx),
        "input_grad_fp8": errors(fp8_base.base_input_grad(grad, w8), reference_dx),
    }
    quantized = fp8_base.quantize_rows_reference(x)
    record["triton_quantizer_equals_torch"] = bool(
        torch.equal(xq.view(torch.uint8), quantized[0].view(torch.uint8))
        and torch.equal(sx, quantized[1])
    )
    return record


def per_call_weight_ms(weight: Any, iters: int) -> dict[str, float]:
    """What a call pays for the e4m3 weight where the plan keeps none, from the NF4 weight (its
    block scales kept in fp32, as the plan keeps them): dequantising to bf16 and quantising (the
    forward's operand) then transposing (the input gradient's), against one kernel from the
    4-bit codes for each layout (``fp8_codes.quantize_4bit_rows``), its default tile and the
    others of :data:`KERNEL_CONFIGS`."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from kubetune.trainer.model import fp8_base, fp8_codes
    from kubetune.trainer.model.fused_lora import _scales

    codes, state = quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    absmax = _scales(type("Weight", (), {"quant_state": state, "data": codes})())

    def dequantized() -> Any:
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            codes, absmax, state.blocksize, state.quant_type, state.shape, torch.bfloat16
        )

    packed = fp8_codes.Packed4bit(
        codes, absmax, state.code.float(), state.blocksize, tuple(weight.shape)
    )
    row_scale = fp8_base.quantize_rows(dequantized())[1].view(-1)
    sweep: dict[str, float] = {}
    assert torch.equal(dequantized(), dequantize_4bit(codes, state).bfloat16())
    made = {
        layout: fp8_codes.quantize_4bit_rows(packed, row_scale, transposed=layout)
        for layout in (False, True)
    }
    for rows, columns, warps in KERNEL_CONFIGS:
        for layout, name in ((False, "forward"), (True, "backward")):

            def run(layout: bool = layout, tile: Any = (rows, columns), warps: int = warps) -> Any:
                return fp8_codes.quantize_4bit_rows(
                    packed, row_scale, transposed=layout, block=tile, num_warps=warps
                )

            # Every tile writes the same bytes.
            differ = int((run().view(torch.uint8) != made[layout].view(torch.uint8)).sum())
            if differ:
                raise AssertionError(f"tile {rows}x{columns} ({name}): {differ} bytes differ")
            sweep[f"weight_from_codes_{name}_{rows}x{columns}_w{warps}"] = timed_ms(run, iters)
    return sweep | {
        "weight_two_step_forward": timed_ms(lambda: fp8_base.quantize_weight(dequantized()), iters),
        "weight_two_step_backward": timed_ms(
            lambda: fp8_base.quantize_weight(dequantized()).with_transposed(), iters
        ),
        "weight_from_codes_forward": timed_ms(
            lambda: fp8_codes.quantize_4bit_rows(packed, row_scale, transposed=False), iters
        ),
        "weight_from_codes_backward": timed_ms(
            lambda: fp8_codes.quantize_4bit_rows(packed, row_scale, transposed=True), iters
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="M: tokens a micro-step")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("fp8-matmul.jsonl"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()

    import torch

    from kubetune.trainer.model import fp8_base

    cpu = args.device == "cpu"
    card = "cpu" if cpu else torch.cuda.get_device_name()
    supported = cpu or fp8_base.supported_on_this_gpu()
    print(json.dumps({"card": card, "torch": torch.__version__, "fp8_supported": supported}))
    if not supported:
        return 1
    for out_features, in_features in SHAPES_7B:
        measured = measure(args.tokens, out_features, in_features, args.iters, args.device)
        record = {"card": card, **measured}
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
