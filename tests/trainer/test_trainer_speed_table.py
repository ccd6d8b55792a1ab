"""The Validating phase's time estimate: seconds from the measured speed of a GPU kind."""

from __future__ import annotations

import pytest

from kubetune.trainer.plan.memory import GIB, RunSettings, plan_memory
from kubetune.trainer.plan.shape import ModelShape
from kubetune.trainer.plan.speed import GPU_KINDS, estimated_seconds, gpu_free_bytes

pytestmark = pytest.mark.unit

LLAMA2_7B = ModelShape(4096, 11008, 32, 32, 32, 32000)
LLAMA3_8B = ModelShape(4096, 14336, 32, 32, 8, 128256)
DEFAULTS = RunSettings(
    max_length=2048, per_device_batch=16, lora_rank=16, lora_dropout=0.0, liger_kernel=True
)
#: Real tokens/s of the 7B defaults, measured with the MFU in the table (bench/results).
MEASURED_7B = {"H200": 17_925, "H100-80GB": 16_269}


def _tokens_per_second(kind: str, shape: ModelShape) -> float:
    plan = plan_memory(shape, DEFAULTS, gpu_free_bytes(kind), cuda=True)
    tokens = 10_000_000
    seconds = estimated_seconds(kind, shape, lora_rank=16, plan=plan, tokens=tokens, ranks=1)
    assert seconds is not None, kind
    return tokens / seconds


@pytest.mark.parametrize("kind", ["H200", "H100-80GB"])
def test_a_measured_kind_gets_seconds_near_its_measured_rate(kind: str) -> None:
    rate = _tokens_per_second(kind, LLAMA2_7B)
    # The estimate counts no attention FLOPs (the bench's MFU does): a few percent optimistic.
    assert MEASURED_7B[kind] * 0.97 < rate < MEASURED_7B[kind] * 1.08


def test_an_h100_is_estimated_slower_than_an_h200_and_the_8b_slower_than_the_7b() -> None:
    assert _tokens_per_second("H100-80GB", LLAMA2_7B) < _tokens_per_second("H200", LLAMA2_7B)
    # On 80 GB the 8B shape gets 8,192 tokens a micro-step: the per-micro-step cost counts.
    plan = plan_memory(LLAMA3_8B, DEFAULTS, gpu_free_bytes("H100-80GB"), cuda=True)
    assert plan.tokens_per_micro_step == 8192 and plan.estimated_peak_bytes < 79 * GIB
    assert _tokens_per_second("H100-80GB", LLAMA3_8B) < _tokens_per_second("H100-80GB", LLAMA2_7B)


def test_a_kind_never_measured_gets_no_seconds() -> None:
    assert GPU_KINDS["A100-80GB"].measured_mfu is None
    plan = plan_memory(LLAMA2_7B, DEFAULTS, gpu_free_bytes("A100-80GB"), cuda=True)
    assert estimated_seconds("A100-80GB", LLAMA2_7B, lora_rank=16, plan=plan, tokens=1000,
                             ranks=1) is None  # fmt: skip


def test_an_fp8_plan_is_estimated_at_its_measured_fp8_rate() -> None:
    """The H100's 7B defaults with the base in FP8 and siblings grouped (22,651 real tokens/s,
    bench/results/h100-2026-12-07-s13-defaults.jsonl) are estimated at the FP8 MFU measured
    there; a kind whose FP8 MFU was never measured is estimated as bf16."""
    from dataclasses import replace

    from kubetune.trainer.plan.memory import FP8_MIN_TOKENS

    fp8 = replace(DEFAULTS, fp8_matmuls=True, fp8_min_tokens=FP8_MIN_TOKENS)
    tokens = 10_000_000
    for kind, gpu in GPU_KINDS.items():
        if not gpu.fp8 or gpu.measured_mfu is None:
            continue
        plan = plan_memory(LLAMA2_7B, fp8, gpu_free_bytes(kind), cuda=True)
        assert plan.fp8_matmuls is True
        bf16 = replace(plan, fp8_matmuls=False, kept_dequantization="none")
        seconds = estimated_seconds(
            kind, LLAMA2_7B, lora_rank=16, plan=plan, tokens=tokens, ranks=1
        )
        before = estimated_seconds(kind, LLAMA2_7B, lora_rank=16, plan=bf16, tokens=tokens, ranks=1)
        assert seconds is not None and before is not None
        gain = (gpu.fp8_mfu or gpu.measured_mfu) / gpu.measured_mfu
        assert before / seconds == pytest.approx(gain)
    plan = plan_memory(LLAMA2_7B, fp8, gpu_free_bytes("H100-80GB"), cuda=True)
    seconds = estimated_seconds("H100-80GB", LLAMA2_7B, lora_rank=16, plan=plan, tokens=tokens,
                                ranks=1)  # fmt: skip
    assert seconds is not None
    assert 22_651 * 0.97 < tokens / seconds < 22_651 * 1.08
