"""The speed seams, resolved for this node: ``auto`` becomes a concrete choice, and what the node
can't run is refused before anything heavy is loaded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

from kubetune.api.models import QuantizationSpec, TrainingSpec
from kubetune.trainer.errors import InvalidConfig
from kubetune.trainer.plan.memory import MemoryPlan, relative_step_cost
from kubetune.trainer.plan.shape import ModelShape


@dataclass(frozen=True)
class SpeedSettings:
    attention: str
    liger_kernel: bool
    gradient_checkpointing: bool
    packing: bool
    optimizer: str
    #: How many decoder layers to checkpoint when gradient_checkpointing is on (None: all).
    checkpointed_layers: int | None = None
    #: Pad each packed micro-step to exactly this many tokens, so that its shape never changes
    #: and flex attention compiles once (None: no padding).
    pad_to_tokens: int | None = None
    #: Keep the checkpointed layers' inputs in CPU memory until the backward pass needs them.
    offload_checkpoints: bool = False
    #: What the fused 4-bit layers keep of their dequantisation for the run (the memory plan's
    #: choice: "scales", "weights", "fp8", "fp8-transposed" or "none").
    kept_dequantization: str = "none"
    #: The frozen base's matmuls in FP8 (``quantization.fp8Matmuls`` as this node resolved it).
    fp8_matmuls: bool = False


#: What ``quantization.fp8Matmuls: auto`` means where FP8 can run (a Hopper GPU, bf16 compute):
#: True, on; False, off (then only ``on`` turns it on). The one switch to flip once a GPU has
#: measured its speed and loss parity (docs/performance.md; the API's description says which).
FP8_AUTO = True


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def auto_attention(packing: bool, cuda: bool, varlen_runs: bool) -> str:
    """``training.attention: auto``: on a GPU, packed sequences through FlashAttention's varlen
    kernel where it runs (no compilation, any length), else flex attention; SDPA elsewhere."""
    if not cuda:
        return "sdpa"
    if packing and varlen_runs:
        return "varlen"
    return "flex_attention" if flex_attention_available() else "sdpa"


def _fp8_runs_on_this_gpu() -> bool:
    from kubetune.trainer.model import fp8_base

    return fp8_base.supported_on_this_gpu()


def resolve_fp8(
    quantization: QuantizationSpec,
    cuda: bool,
    *,
    fp8_runs: bool | None,
    preference: bool,
    lora_dropout: float = 0.0,
) -> bool:
    """``quantization.fp8Matmuls`` for this node: whether the base's matmuls run in FP8;
    InvalidConfig for ``on`` where they can't. ``fp8_runs``: whether the GPU runs row-wise FP8
    matmuls (None: ask this node's GPU; the preflight answers for the GPU kind the run will
    get). ``auto`` stays off for preference runs: their reference pass runs the base in bf16
    (adapters off, PEFT's forward), and an FP8 policy against it would start with non-zero
    log-ratios. A LoRA dropout turns it off (``on``: refused): the FP8 matmuls run in the
    fused LoRA layer, and a layer with dropout takes PEFT's own forward."""
    if quantization.fp8_matmuls == "off":
        return False
    if fp8_runs is None:
        fp8_runs = cuda and _fp8_runs_on_this_gpu()
    runs = cuda and fp8_runs and quantization.compute_dtype == "bfloat16"
    if quantization.fp8_matmuls == "on":
        if not runs:
            raise InvalidConfig(
                "quantization.fp8Matmuls: on needs a CUDA GPU of compute capability 9.0 or newer "
                "(H100, H200), torch's row-wise FP8 matmul (torch >= 2.5) and "
                "quantization.computeDtype: bfloat16; use auto or off"
            )
        if lora_dropout > 0:
            raise InvalidConfig(
                "quantization.fp8Matmuls: on needs lora.dropout: 0 (the FP8 matmuls run in the "
                "fused LoRA layer, which takes no dropout); use auto or off, or set lora.dropout: 0"
            )
        return True
    return runs and FP8_AUTO and not preference and lora_dropout == 0


def resolve_speed(
    training: TrainingSpec, cuda: bool, *, varlen_runs: bool | None = None
) -> SpeedSettings:
    """Turn the spec's ``auto`` settings into what this node can run; refuse what it can't.
    ``varlen_runs``: whether the GPU runs varlen attention (None: ask this node's GPU; the
    preflight, on a CPU, answers for the GPU the run will get)."""
    from kubetune.trainer.model import varlen_attention

    if varlen_runs is None:
        varlen_runs = cuda and varlen_attention.supported_on_this_gpu()
    for kernel in ("flex_attention", "varlen"):
        if training.attention == kernel and not cuda:
            raise InvalidConfig(f"training.attention: {kernel} needs a CUDA GPU; use sdpa")
    if training.attention == "varlen":
        if not training.packing:
            raise InvalidConfig(
                "training.attention: varlen attends within packed sequences; set "
                "training.packing: true, or use sdpa"
            )
        if not varlen_runs:
            raise InvalidConfig(
                "training.attention: varlen needs torch >= 2.10 and a GPU of compute capability "
                "8.0 or newer; use auto"
            )
    if training.attention == "auto":
        attention = auto_attention(training.packing, cuda, varlen_runs)
    else:
        attention = training.attention
    if training.liger_kernel == "on" and not (cuda and liger_available()):
        raise InvalidConfig(
            "training.ligerKernel: on needs a CUDA GPU and the liger-kernel package; "
            "use auto or off"
        )
    liger = training.liger_kernel == "on" or (
        training.liger_kernel == "auto" and cuda and liger_available()
    )
    optimizer = training.optimizer
    if optimizer == "auto":
        # The paged 8-bit optimizer is bitsandbytes' CUDA kernel; the CPU gets plain AdamW.
        optimizer = "paged_adamw_8bit" if cuda else "adamw_torch"
    else:
        check_optimizer(optimizer)
    return SpeedSettings(
        attention=attention,
        liger_kernel=liger,
        # Unset (auto) is decided by the memory plan (apply_plan); until then, no checkpointing.
        gradient_checkpointing=bool(training.gradient_checkpointing),
        packing=training.packing,
        optimizer=optimizer,
    )


def apply_plan(speed: SpeedSettings, plan: MemoryPlan) -> SpeedSettings:
    """The speed settings with the memory plan's checkpointing, optimizer and micro-step shape.

    Packed micro-steps under flex attention are padded to the plan's tokens per micro-step: one
    shape for the whole run, so flex attention (and Liger's kernels) compile once instead of
    again for every new length (what that cost: docs/performance.md, "Figures behind the
    trainer's constants").
    """
    bucket = speed.packing and speed.attention == "flex_attention"
    return replace(
        speed,
        gradient_checkpointing=plan.gradient_checkpointing,
        checkpointed_layers=(
            plan.checkpointed_layers
            if plan.gradient_checkpointing and not plan.all_layers
            else None
        ),
        optimizer=plan.optimizer,
        pad_to_tokens=plan.tokens_per_micro_step if bucket else None,
        offload_checkpoints=plan.offload_checkpoints,
        kept_dequantization=plan.kept_dequantization,
        fp8_matmuls=plan.fp8_matmuls,
    )


def optimizer_names() -> list[str]:
    """The optimizer names transformers knows (imported here, when the node is set up)."""
    from transformers.training_args import OptimizerNames

    return sorted(str(o.value) for o in OptimizerNames)


def check_optimizer(name: str) -> None:
    """Refuse an optimizer name transformers doesn't know, naming the field and the choices."""
    known = optimizer_names()
    if name not in known:
        raise InvalidConfig(
            f"spec.training.optimizer: unknown optimizer {name!r}; use auto or one of "
            + ", ".join(known)
        )


# --- the measured speed table (the preflight's estimate) -----------------------------------------


@dataclass(frozen=True)
class GpuKind:
    """What the preflight knows of a GPU kind: its memory, and, where measured, its speed."""

    #: Total memory as the driver reports it (MiB, the cards' specifications).
    memory_mib: int
    #: Dense bf16 tensor-core peak (TFLOP/s, the vendor's figure).
    bf16_tflops: float
    #: Model FLOPs utilisation kubetune measured on it with the default plan (None: never
    #: measured; the estimate then gives no seconds rather than a guess).
    measured_mfu: float | None = None
    source: str = ""
    #: Whether it runs FP8 matmuls with row-wise scales (compute capability 9.0 or newer).
    fp8: bool = False
    #: The MFU of the default plan with the frozen base's matmuls in FP8 (the default where the
    #: card runs them), as measured (None: not measured; the estimate then uses the bf16 MFU,
    #: counting FP8 as no faster).
    fp8_mfu: float | None = None


#: The card's memory that the CUDA context and the libraries hold before the plan's share:
#: 1.0–1.8 GiB not free at the plan's moment on an H100 80GB, 1.1–1.7 GiB on an H200, from one
#: process to the next on one card (the bench's records, docs/performance.md). The plan on a card
#: of its own counts the card's memory less this (``card.capped_free_bytes``), so that it is the
#: same in every process, and the same as the preflight's.
CONTEXT_BYTES = 2 * 2**30

#: The GPU kinds the preflight plans for; the measured MFUs and the runs they come from:
#: docs/performance.md, "Figures behind the trainer's constants".
GPU_KINDS: dict[str, GpuKind] = {
    "H200": GpuKind(
        143771, 989.0, 0.494, "docs/trainer.md, H200 2026-11-29, 7B defaults", fp8=True
    ),
    "H100-80GB": GpuKind(
        81559,
        989.0,
        0.449,
        "docs/trainer.md, H100 2026-12-05, 7B defaults in bf16; FP8: H100 2026-12-07 (thirteenth "
        "session), 7B defaults with the base in FP8 and siblings grouped, 22,651 real tokens/s",
        fp8=True,
        fp8_mfu=0.625,
    ),
    "A100-80GB": GpuKind(81920, 312.0),
    "A100-40GB": GpuKind(40960, 312.0),
    "L40S": GpuKind(46068, 362.0),
    "L4": GpuKind(23034, 121.0),
}
#: The plan the MFU above was measured with: no checkpointing, 16,384 tokens a micro-step.
MEASURED_TOKENS_PER_MICRO_STEP = 16384


def gpu_free_bytes(kind: str) -> int:
    return GPU_KINDS[kind].memory_mib * 2**20 - CONTEXT_BYTES


def flops_per_token(shape: ModelShape, lora_rank: int) -> float:
    """Training FLOPs per real token, as docs/trainer.md counts them for MFU: 4 per frozen base
    weight (forward, and the input gradients only), 6 per adapter weight (attention left out:
    a few percent at the measured lengths)."""
    return 4.0 * shape.linear_params() + 6.0 * shape.lora_params(lora_rank)


def estimated_seconds(
    kind: str, shape: ModelShape, *, lora_rank: int, plan: MemoryPlan, tokens: int, ranks: int
) -> float | None:
    """Seconds to train ``tokens`` real tokens on ``ranks`` GPUs of ``kind``: the measured MFU,
    in FP8 where the plan runs the base in FP8 and the card's FP8 MFU was measured, corrected
    by the memory model's cost of this plan's recompute and micro-step size relative to the
    measured plan (ranks assumed to scale linearly). None where the kind was never measured."""
    gpu = GPU_KINDS.get(kind)
    if gpu is None or gpu.measured_mfu is None or tokens <= 0:
        return None
    mfu = gpu.fp8_mfu if plan.fp8_matmuls and gpu.fp8_mfu is not None else gpu.measured_mfu
    per_second = gpu.bf16_tflops * 1e12 * mfu / flops_per_token(shape, lora_rank)
    cost = relative_step_cost(plan.checkpointed_layers, plan.layers, plan.tokens_per_micro_step)
    measured = relative_step_cost(0, plan.layers, MEASURED_TOKENS_PER_MICRO_STEP)
    return tokens / (per_second * max(ranks, 1)) * cost / measured
