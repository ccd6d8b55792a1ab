"""The memory plan for this run on this card: the pure ``plan_memory`` fed with what only the
node knows (the card's free memory), the refusal of a run that can't fit, and the plan as the
result reports it."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from kubetune.api.models import FineTuneJobSpec, MemoryPlanReport, TrainingPlan
from kubetune.trainer.errors import OutOfMemory
from kubetune.trainer.plan.memory import GIB, MemoryPlan, ModelShape, RunSettings, plan_memory
from kubetune.trainer.run.preference import fewest_per_micro_batch, sequences_per_example

if TYPE_CHECKING:
    from kubetune.trainer.plan.speed import SpeedSettings

log = logging.getLogger(__name__)


def capped_free_bytes(free: int, total: int, fraction: float, reserved: int) -> int:
    """What this process may still allocate on a card with ``free`` bytes free of ``total``, when
    its allocator is capped to ``fraction`` of the card (``set_per_process_memory_fraction``:
    a GPU shared by several pods, or a benchmark standing in for a smaller card) and already
    holds ``reserved`` bytes."""
    if fraction >= 1.0:
        return free
    return max(0, min(free, int(total * fraction) - reserved))


def usable_gpu_bytes() -> int:
    """This card's free memory as the plan may fill it: CUDA's free memory, or less where this
    process's allocator is capped."""
    import torch

    free, total = torch.cuda.mem_get_info()
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(getter()) if getter is not None else 1.0
    return capped_free_bytes(int(free), int(total), fraction, int(torch.cuda.memory_reserved()))


def plan_for_this_card(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    shape: ModelShape | None,
    cuda: bool,
    *,
    free_bytes: int | None = None,
) -> MemoryPlan:
    """The plan for ``shape`` on this node's GPU (or the CPU); OutOfMemory, naming the knob,
    for a run whose leanest plan needs more than the card has free. ``free_bytes``: the card's
    free memory (read from CUDA when not given, within this process's memory cap if it has
    one: :func:`usable_gpu_bytes`)."""
    training = spec.training
    per_device = plan.micro_batch_size * plan.gradient_accumulation_steps
    chosen = (
        training.micro_batch_size is not None or training.gradient_accumulation_steps is not None
    )
    # A DPO pair is two sequences in the same micro-batch: the plan sees it as one of twice the
    # length (activations grow with the tokens); the reference pass keeps nothing for backward.
    sequences = sequences_per_example(spec.method)
    run = RunSettings(
        max_length=training.max_length * sequences,
        per_device_batch=per_device,
        lora_rank=spec.lora.r,
        lora_dropout=spec.lora.dropout,
        liger_kernel=speed.liger_kernel,
        micro_batch_size=plan.micro_batch_size if chosen else None,
        gradient_checkpointing=training.gradient_checkpointing,
        optimizer=training.optimizer,
        profile=training.profile,
    )
    free = free_bytes
    if cuda and free is None:
        free = usable_gpu_bytes()
    fewest = fewest_per_micro_batch(spec.method)
    if shape is not None:
        memory = plan_memory(shape, run, free, cuda=cuda)
        if memory.micro_batch_size < fewest <= per_device:
            memory = plan_memory(shape, replace(run, micro_batch_size=fewest), free, cuda=cuda)
    else:  # an unknown shape: what the spec says; on a GPU, checkpointing when unset
        checkpointing = training.gradient_checkpointing
        if checkpointing is None:
            checkpointing = cuda or training.profile == "memory"
        micro = plan.micro_batch_size
        if training.profile == "memory" and not chosen:
            micro = min(fewest, per_device)
        memory = MemoryPlan(
            checkpointed_layers=1 if checkpointing else 0,
            layers=1,
            micro_batch_size=micro,
            tokens_per_micro_step=micro * training.max_length * sequences,
            optimizer=speed.optimizer,
            estimated_peak_bytes=None,
            free_bytes=free,
            profile=training.profile,
        )
    if not memory.fits and shape is not None and training.profile == "speed":
        # The speed plan's leanest choice doesn't fit; the memory profile's might.
        lean = plan_memory(shape, replace(run, profile="memory"), free, cuda=cuda)
        if lean.fits:
            assert lean.estimated_peak_bytes is not None and free is not None
            raise OutOfMemory(
                f"this run needs about {(memory.estimated_peak_bytes or 0) / GIB:.1f} GiB of GPU "
                f"memory at its fastest ({memory.summary()}); the GPU has {free / GIB:.1f} GiB "
                f"free; set training.profile: memory (about "
                f"{lean.estimated_peak_bytes / GIB:.1f} GiB, slower)"
            )
    if not memory.fits and memory.estimated_peak_bytes and free:
        message = (
            f"this run needs about {memory.estimated_peak_bytes / GIB:.1f} GiB of GPU memory "
            f"at its leanest ({memory.summary()}); the GPU has {free / GIB:.1f} GiB free"
        )
        if memory.estimated_peak_bytes > free:
            knob = f"training.maxLength (now {training.max_length})"
            raise OutOfMemory(f"{message}; lower {knob} or use a larger GPU")
        log.warning("%s: it may not fit", message)
    return memory


def plan_report(memory: MemoryPlan, plan: TrainingPlan, cuda: bool) -> MemoryPlanReport:
    """The memory plan as result.json and the status show it, with the peak measured so far."""
    peak = None
    if cuda:
        import torch

        peak = round(torch.cuda.max_memory_allocated() / GIB, 2)
    estimated, free = memory.estimated_peak_bytes, memory.free_bytes
    return MemoryPlanReport(
        gradient_checkpointing=memory.describe_checkpointing(),
        micro_batch_size=plan.micro_batch_size,
        tokens_per_micro_step=memory.tokens_per_micro_step,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        optimizer=memory.optimizer,
        profile=memory.profile,
        checkpoints_offloaded=memory.offload_checkpoints,
        estimated_peak_gib=round(estimated / GIB, 2) if estimated is not None else None,
        free_gib=round(free / GIB, 2) if free is not None else None,
        peak_gib=peak,
    )
