"""The memory-aware plan: how much of the card a run may fill, and what it buys with it.

``plan_memory`` is a pure function of the model's shape, the run's settings and the card's free
memory (a number: the recipe reads it from CUDA, the tests pass one in). It picks the fastest
combination that its memory model says fits:

- **activation checkpointing**: off, some of the decoder layers (as few as fit, spread evenly),
  or all of them; each checkpointed layer costs its forward again in the backward pass;
- **tokens per micro-step**: packed rows of ``maxLength`` per forward pass (``batchSize`` is kept
  by gradient accumulation); bigger micro-steps spread the per-pass costs (dequantising the 4-bit
  weights, launching kernels) over more tokens;
- **the optimizer**: fused AdamW when the card has room for its fp32-sized states, the paged
  8-bit AdamW when memory is tight;
- **what the fused 4-bit layers keep of their dequantisation** (``fused_lora``): the NF4 block
  scales in fp32 once :data:`KEEP_SCALES` is on (0.4 GiB for a 7B base; one dequantisation
  kernel instead of three), the whole base in bf16 where it fits beside the plan once
  :data:`KEEP_WEIGHTS_WHERE_THEY_FIT` is on (both stay off until a GPU has measured them); with
  the base's matmuls in FP8 (``quantization.fp8Matmuls``), the e4m3 base where it fits beside
  the plan (one byte a weight, four a row: 6 GiB for a 7B base), else it is quantised again
  in every call.

``training.profile: memory`` asks for the least memory instead of the most speed: every layer
checkpointed, the checkpoints themselves kept in (pinned) CPU memory on a GPU, one packed row of
``maxLength`` a micro-step and the paged 8-bit AdamW; what the spec sets explicitly is kept.

The memory model counts the 4-bit base, the bf16 embeddings, the adapter with its gradients and
optimizer state, and the activations a decoder layer keeps per token (fitted to peaks measured
on an H200 with a Llama-2-7B shape, docs/trainer.md: 36.5 GiB at 8,192 tokens without
checkpointing, 7.2 GiB with it, +16.6 GiB for LoRA dropout). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kubetune.trainer.plan.shape import ModelShape

GIB = 2**30

#: NF4 with double quantisation: 4 bits a weight, an 8-bit absmax per 64 weights, and an fp32
#: constant per 256 absmax values.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: Activation bytes a decoder layer keeps per token without checkpointing, as multiples of the
#: hidden size, the key/value width and the MLP width (bf16, Liger's fused norm/SwiGLU/RoPE,
#: flex attention), fitted to the measured 7B peaks.
ACT_PER_HIDDEN = 14.0
ACT_PER_KV = 2.0
ACT_PER_INTERMEDIATE = 6.0
#: What LoRA dropout adds per token and layer (each adapted Linear keeps its dropped input).
DROPOUT_PER_HIDDEN = 10.0
DROPOUT_PER_INTERMEDIATE = 2.5
#: A checkpointed layer keeps only its bf16 input (nothing on the GPU when it is offloaded).
CHECKPOINTED_PER_HIDDEN = 2.0
OFFLOADED_PER_HIDDEN = 0.0
#: The loss head per token: Liger's fused linear cross-entropy never builds the logits; without
#: it the logits are kept in bf16 and upcast to fp32, with an fp32 gradient.
LOSS_PER_HIDDEN_FUSED = 4.0
LOSS_PER_VOCAB_UNFUSED = 10.0
#: The adapter: bf16 weights and gradients (TRL keeps QLoRA adapters in bf16), plus the states.
ADAPTER_BYTES = 4.0
OPTIMIZER_STATE_BYTES = {"adamw_torch_fused": 8.0, "adamw_torch": 8.0, "paged_adamw_8bit": 2.0}
#: Kept free of the plan: the allocator's fragmentation and what other libraries allocate.
RESERVE_FRACTION = 0.08
RESERVE_BYTES = 1.5 * GIB
#: A checkpointed layer's recompute, as a fraction of a layer's forward + backward (forward is
#: about a third: the frozen base computes input gradients only, so a bit more).
RECOMPUTE_COST = 0.4
#: The per-micro-step cost that does not grow with tokens (dequantising the 4-bit weights,
#: launches), in tokens' worth of compute: fitted to 16,384- vs 8,192-token micro-steps on an
#: H200 (varlen attention, fused LoRA layers, one command): 7B 17,925 vs 17,227 tokens/s (F ~ 690),
#: 8B 16,081 vs 15,177 (F ~ 1,040); an earlier command saw no difference on 7B (F ~ 0).
FIXED_COST_TOKENS = 700
#: The least time a micro-step takes, in tokens' worth of compute: below it the GPU waits on the
#: host launching the micro-step's kernels (~7,000: PEFT, bitsandbytes, autograd). Measured on an
#: H100 80GB with the 7B shape under memory caps (bench/results/h100-2026-12-05-s2-*): a micro-step
#: of 2,048 tokens took 0.31 s and one of 4,096 tokens 0.32 s, against 1.0 s for 16,384 tokens,
#: so the 2,048-token micro-step the plan chose for a 16 GiB card ran at 6,637 tokens/s where
#: the 16,384-token one ran 16,357 (floor ≈ 4,700 tokens).
HOST_FLOOR_TOKENS = 4700
#: Micro-steps stop here: beyond 16,384 tokens the fixed cost is < 5% and memory grows linearly
#: (7B: 37 GiB at 8,192 tokens, 69 GiB at 16,384).
MAX_TOKENS_PER_MICRO_STEP = 16384
#: Headroom the fused (fp32-state) optimizer needs beyond the plan before it is chosen.
FUSED_OPTIMIZER_HEADROOM = 2 * GIB
#: What the fused 4-bit layers keep of their dequantisation for the run
#: (``fused_lora.keep_dequantization``): the NF4 block scales in fp32 (one kernel a
#: dequantisation instead of three; 4 bytes per 64 weights on top of the double-quantised ones).
KEPT_SCALES_BYTES_PER_PARAM = 4 / 64
#: Whether the plan keeps them: off until a GPU measures what it gains (the bench's
#: ``kubetune-scales`` mode turns it on); the CPU tests prove the kept path exact.
KEEP_SCALES = False
#: The whole base in bf16 (no dequantisation in a step) where it fits beside the fastest plan:
#: 2 bytes a weight (13 GB for a 7B base). Off until a GPU measures what it gains (the bench's
#: ``kubetune-keepw`` mode turns it on).
KEEP_WEIGHTS_WHERE_THEY_FIT = False
KEPT_WEIGHT_BYTES_PER_PARAM = 2.0
#: The base in e4m3 for the FP8 matmuls (``fp8_base.Fp8Weight``): a byte a weight and an fp32
#: scale a row (output feature), kept where it fits beside the fastest plan (else each call
#: makes it again from the 4-bit codes, ``fp8_codes``).
KEPT_FP8_BYTES_PER_PARAM = 1.0
#: Keep the e4m3 base's transposed copy too where both fit beside the fastest plan (another byte
#: a weight; no transpose of the weight in a backward call: 0.14-0.36 ms a 7B layer on an H100,
#: bench/results/h100-2026-12-06-fp8-matmul.jsonl). Off until a GPU measures what it gains (the
#: bench's ``kubetune-fp8-keept`` mode turns it on).
KEEP_FP8_TRANSPOSED_WHERE_THEY_FIT = False
#: ``quantization.fp8Matmuls: auto`` runs the base in FP8 only from this many tokens a micro-step:
#: measured on an H100 80GB, FP8 gained 5.7% over the two-step per-call weight and 48% over TRL's
#: best at 16,384 tokens (7B), and 27% over bf16 at 4,096 (7B under a 24 GiB cap,
#: bench/results/h100-2026-12-06-s9-*), since the per-call e4m3 weight comes straight from the
#: 4-bit codes at memory-bound speed. Smaller micro-steps are unmeasured: bf16.
FP8_MIN_TOKENS = 4096
KEPT_FP8_BYTES_PER_ROW = 4.0


def kept_fp8_bytes(shape: ModelShape, *, per_call: bool = False) -> float:
    """What the FP8 matmuls keep for the run: the e4m3 base (a byte a weight) or, where it is
    made again in every call (``per_call``), the NF4 block scales in fp32; a scale a row both."""
    per_param = KEPT_SCALES_BYTES_PER_PARAM if per_call else KEPT_FP8_BYTES_PER_PARAM
    return shape.linear_params() * per_param + shape.linear_rows() * KEPT_FP8_BYTES_PER_ROW


@dataclass(frozen=True)
class RunSettings:
    """What the run fixes before the plan: the spec's choices and what the node resolved."""

    max_length: int
    per_device_batch: int
    lora_rank: int
    lora_dropout: float
    liger_kernel: bool
    micro_batch_size: int | None = None  # set by the user: kept
    gradient_checkpointing: bool | None = None  # None: the plan decides
    optimizer: str = "auto"  # "auto": the plan decides
    profile: str = "speed"  # "speed" or "memory" (training.profile)
    fp8_matmuls: bool = False  # the base's matmuls in FP8 (quantization.fp8Matmuls, resolved)
    #: FP8 only where a micro-step has at least this many tokens (``auto``'s rule,
    #: :data:`FP8_MIN_TOKENS`); 0 wherever ``fp8_matmuls`` is on (``on``).
    fp8_min_tokens: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    """The plan: what runs, and what the memory model expects of it."""

    checkpointed_layers: int  # 0: no checkpointing
    layers: int
    micro_batch_size: int
    tokens_per_micro_step: int
    optimizer: str
    estimated_peak_bytes: int | None
    free_bytes: int | None
    fits: bool = True
    profile: str = "speed"
    #: The checkpointed layers' inputs wait for the backward pass in CPU memory.
    offload_checkpoints: bool = False
    #: What the fused 4-bit layers keep of their dequantisation: "scales", "weights", "fp8"
    #: (the base in e4m3 for the FP8 matmuls), "fp8-transposed" (and its transposed copy) or
    #: "none".
    kept_dequantization: str = "none"
    #: The base's matmuls run in FP8 (the e4m3 weight kept when ``kept_dequantization`` is
    #: "fp8", else quantised in every call).
    fp8_matmuls: bool = False

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    @property
    def all_layers(self) -> bool:
        return self.checkpointed_layers >= self.layers

    def describe_checkpointing(self) -> str:
        if self.checkpointed_layers == 0:
            return "off"
        if self.all_layers:
            return "all layers, offloaded to CPU" if self.offload_checkpoints else "all layers"
        return f"{self.checkpointed_layers} of {self.layers} layers"

    def summary(self) -> str:
        parts = [
            f"gradient checkpointing {self.describe_checkpointing()}",
            f"{self.micro_batch_size} x {self.tokens_per_micro_step // self.micro_batch_size} "
            f"tokens per micro-step",
            f"optimizer {self.optimizer}",
        ]
        if self.estimated_peak_bytes is not None and self.free_bytes is not None:
            parts.append(
                f"estimated peak {self.estimated_peak_bytes / GIB:.1f} GiB of "
                f"{self.free_bytes / GIB:.1f} GiB free"
            )
        return ", ".join(parts)


def static_bytes(shape: ModelShape, run: RunSettings, optimizer: str) -> float:
    """Memory held for the whole run: the 4-bit base, the embeddings, the adapter's training."""
    adapter = shape.lora_params(run.lora_rank)
    state = OPTIMIZER_STATE_BYTES.get(optimizer, 8.0)
    return (
        shape.linear_params() * NF4_BYTES_PER_PARAM
        + shape.embedding_params() * 2
        + adapter * (ADAPTER_BYTES + state)
    )


def layer_activation_bytes(shape: ModelShape, run: RunSettings) -> float:
    """Bytes one decoder layer keeps per token for its backward pass, without checkpointing."""
    h, i = shape.hidden, shape.intermediate
    kept = ACT_PER_HIDDEN * h + ACT_PER_KV * shape.kv_width + ACT_PER_INTERMEDIATE * i
    if run.lora_dropout > 0:
        kept += DROPOUT_PER_HIDDEN * h + DROPOUT_PER_INTERMEDIATE * i
    return kept


def estimate_peak_bytes(
    shape: ModelShape,
    run: RunSettings,
    *,
    checkpointed_layers: int,
    tokens: int,
    optimizer: str,
    offload: bool = False,
    kept_scales: bool | None = None,
) -> float:
    """The memory model: peak bytes of one training step (``kept_scales``: with the fused
    layers' block scales kept in fp32; by default as the plan keeps them, :data:`KEEP_SCALES`)."""
    if kept_scales is None:
        kept_scales = KEEP_SCALES
    per_layer = layer_activation_bytes(shape, run)
    kept = shape.layers - checkpointed_layers
    checkpoint = OFFLOADED_PER_HIDDEN if offload else CHECKPOINTED_PER_HIDDEN
    activations = tokens * (kept * per_layer + checkpointed_layers * checkpoint * shape.hidden)
    if checkpointed_layers:
        activations += tokens * per_layer  # the layer being recomputed
    if run.liger_kernel:
        loss = tokens * LOSS_PER_HIDDEN_FUSED * shape.hidden
    else:
        loss = tokens * LOSS_PER_VOCAB_UNFUSED * shape.vocab
    scales = shape.linear_params() * KEPT_SCALES_BYTES_PER_PARAM if kept_scales else 0.0
    return static_bytes(shape, run, optimizer) + scales + activations + loss


def budget_bytes(free_bytes: int) -> float:
    return free_bytes * (1 - RESERVE_FRACTION) - RESERVE_BYTES


def relative_step_cost(checkpointed_layers: int, layers: int, tokens: int) -> float:
    """Time per token relative to the ideal (no recompute, no per-pass cost): a micro-step costs
    its tokens, at least the host's floor, plus the fixed per-pass cost; recompute scales both
    (a checkpointed layer's forward runs, and is launched, twice)."""
    recompute = 1 + RECOMPUTE_COST * checkpointed_layers / layers
    return recompute * (max(tokens, HOST_FLOOR_TOKENS) + FIXED_COST_TOKENS) / tokens


def _checkpoint_choices(layers: int, forced: bool | None) -> range:
    """How many layers may be checkpointed: none or all when the spec says, else any count."""
    if forced is False:
        return range(0, 1)
    if forced is True:
        return range(layers, layers + 1)
    return range(0, layers + 1)


def _micro_choices(run: RunSettings) -> list[int]:
    if run.micro_batch_size is not None:
        return [run.micro_batch_size]
    divisors = [d for d in range(1, run.per_device_batch + 1) if run.per_device_batch % d == 0]
    capped = [d for d in divisors if d * run.max_length <= MAX_TOKENS_PER_MICRO_STEP]
    return capped or [1]


def _unestimated(
    shape: ModelShape, run: RunSettings, micro: int, checkpointed: int, optimizer: str
) -> MemoryPlan:
    """``micro`` sequences of ``run.max_length`` tokens a micro-step with ``checkpointed`` of the
    model's layers checkpointed, before any estimate of its peak (a CPU run's whole plan)."""
    return MemoryPlan(
        checkpointed_layers=checkpointed,
        layers=shape.layers,
        micro_batch_size=micro,
        tokens_per_micro_step=micro * run.max_length,
        optimizer=optimizer,
        estimated_peak_bytes=None,
        free_bytes=None,
        fp8_matmuls=_fp8_runs(run, micro),
    )


def _fp8_runs(run: RunSettings, micro: int) -> bool:
    """Whether the base's matmuls run in FP8 at ``micro`` rows a micro-step."""
    return run.fp8_matmuls and micro * run.max_length >= run.fp8_min_tokens


def plan_memory(
    shape: ModelShape, run: RunSettings, free_bytes: int | None, *, cuda: bool
) -> MemoryPlan:
    """The fastest checkpointing, micro-step and optimizer that fit ``free_bytes`` (None: no
    accelerator to fill; the CPU keeps everything and runs up to 4 sequences a pass)."""
    if run.profile == "memory":
        return _least_memory_plan(shape, run, free_bytes if cuda else None)
    if not cuda or free_bytes is None:
        micro = run.micro_batch_size or max(
            d for d in range(1, min(run.per_device_batch, 4) + 1) if run.per_device_batch % d == 0
        )
        checkpointed = shape.layers if run.gradient_checkpointing else 0
        optimizer = "adamw_torch" if run.optimizer == "auto" else run.optimizer
        return _unestimated(shape, run, micro, checkpointed, optimizer)
    budget = budget_bytes(free_bytes)
    lean = "paged_adamw_8bit" if run.optimizer == "auto" else run.optimizer
    candidates = []
    for micro in _micro_choices(run):
        tokens = micro * run.max_length
        for layers in _checkpoint_choices(shape.layers, run.gradient_checkpointing):
            peak = estimate_peak_bytes(
                shape, run, checkpointed_layers=layers, tokens=tokens, optimizer=lean
            )
            cost = relative_step_cost(layers, shape.layers, tokens)
            candidates.append((peak <= budget, cost, peak, micro, layers))
    fitting = [c for c in candidates if c[0]]
    if fitting:
        _, _, peak, micro, checkpointed = min(fitting, key=lambda c: (c[1], c[2]))
    else:
        _, _, peak, micro, checkpointed = min(candidates, key=lambda c: (c[2], c[1]))
    optimizer = lean
    if run.optimizer == "auto" and fitting:
        extra = shape.lora_params(run.lora_rank) * (
            OPTIMIZER_STATE_BYTES["adamw_torch_fused"] - OPTIMIZER_STATE_BYTES[lean]
        )
        if peak + extra + FUSED_OPTIMIZER_HEADROOM <= budget:
            optimizer, peak = "adamw_torch_fused", peak + extra
    kept = "scales" if KEEP_SCALES else "none"
    weights = shape.linear_params() * KEPT_WEIGHT_BYTES_PER_PARAM
    if _fp8_runs(run, micro):
        # The e4m3 base serves every matmul of a step; a bf16 copy would serve none.
        both = kept_fp8_bytes(shape) + shape.linear_params() * KEPT_FP8_BYTES_PER_PARAM
        if KEEP_FP8_TRANSPOSED_WHERE_THEY_FIT and fitting and peak + both <= budget:
            kept, peak = "fp8-transposed", peak + both
        elif fitting and peak + kept_fp8_bytes(shape) <= budget:
            kept, peak = "fp8", peak + kept_fp8_bytes(shape)
        elif kept == "none" and fitting and peak + kept_fp8_bytes(shape, per_call=True) <= budget:
            # Made again in every call, from the 4-bit codes by one kernel reading fp32 scales.
            kept, peak = "scales", peak + kept_fp8_bytes(shape, per_call=True)
    elif KEEP_WEIGHTS_WHERE_THEY_FIT and fitting and peak + weights <= budget:
        kept, peak = "weights", peak + weights
    return replace(
        _unestimated(shape, run, micro, checkpointed, optimizer),
        estimated_peak_bytes=int(peak),
        free_bytes=free_bytes,
        fits=bool(fitting),
        kept_dequantization=kept,
    )


def _least_memory_plan(shape: ModelShape, run: RunSettings, free_bytes: int | None) -> MemoryPlan:
    """``training.profile: memory``: every layer checkpointed (unless the spec turns it off), its
    checkpoints offloaded to CPU memory on a GPU, one row a micro-step, paged 8-bit AdamW."""
    micro = run.micro_batch_size or 1
    checkpointed = 0 if run.gradient_checkpointing is False else shape.layers
    if run.optimizer != "auto":
        optimizer = run.optimizer
    else:
        optimizer = "paged_adamw_8bit" if free_bytes is not None else "adamw_torch"
    # Every byte counts here; the launches don't: no dequantization kept.
    plan = replace(
        _unestimated(shape, run, micro, checkpointed, optimizer),
        profile="memory",
        kept_dequantization="none",
    )
    if free_bytes is None:
        return plan
    offload = checkpointed == shape.layers
    peak = int(
        estimate_peak_bytes(
            shape,
            run,
            checkpointed_layers=checkpointed,
            tokens=plan.tokens_per_micro_step,
            optimizer=optimizer,
            offload=offload,
            kept_scales=False,
        )
    )
    return replace(
        plan,
        estimated_peak_bytes=peak,
        free_bytes=free_bytes,
        fits=peak <= budget_bytes(free_bytes),
        offload_checkpoints=offload,
    )


def checkpointed_layer_indices(checkpointed: int, layers: int) -> list[int]:
    """Which of ``layers`` decoder layers to checkpoint when ``checkpointed`` of them are: spread
    evenly, so every stretch of the network keeps some of its activations."""
    if checkpointed <= 0:
        return []
    return sorted({min(layers - 1, (i * layers) // checkpointed) for i in range(checkpointed)})
