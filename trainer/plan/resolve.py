"""The run's plan, resolved once for this node: speed settings, memory plan, micro-batches.

Every ``auto`` of the speed settings, then the memory plan for this card (checkpointing, tokens
per micro-step, the optimizer) and the micro-batch re-split that keeps the batch. The recipe, the
preflight and every rank of a distributed run go through here.

Who decides what, in this order: :func:`node_speed` turns ``attention``, ``ligerKernel`` and
``packing`` into what this node runs and refuses what it can't (before anything heavy loads);
``optimizer`` and ``gradientCheckpointing`` stay provisional there (``auto`` → the node's
leanest choice, unset → off) until :func:`fit_to_card`, where the memory plan
(:func:`~kubetune.trainer.plan.memory.plan_memory`, fed with this card's free memory) takes them,
refusing a run that can't fit, and :func:`~kubetune.trainer.plan.speed.apply_plan` writes them
into the speed settings the trainer's arguments are built from. One plan, reported as
``MemoryPlanReport`` (result.json, the status) and ``EstimatePlan`` (the preflight's estimate):
both are read off the :class:`RunPlan` (:mod:`~kubetune.trainer.plan.card`), with the same
settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kubetune.trainer.errors import InvalidConfig, OutOfMemory
from kubetune.trainer.plan.memory import (
    FP8_MIN_TOKENS,
    GIB,
    MemoryPlan,
    RunSettings,
    plan_memory,
)
from kubetune.trainer.plan.shape import ModelShape
from kubetune.trainer.run.preference import fewest_per_micro_batch, sequences_per_example

if TYPE_CHECKING:
    from kubetune.api.models import FineTuneJobSpec, TrainingPlan
    from kubetune.trainer.plan.speed import SpeedSettings

log = logging.getLogger(__name__)


def training_plan(spec: FineTuneJobSpec) -> TrainingPlan:
    """The spec's batch as micro-batches and accumulation on its ranks (InvalidConfig where
    they don't divide)."""
    from kubetune.api.models import plan_training

    try:
        return plan_training(spec.training, spec.resources.world_size)
    except ValueError as exc:
        raise InvalidConfig(str(exc)) from None


@dataclass(frozen=True)
class RunPlan:
    """What a run on this node trains with: the batch split, the speed settings and the memory
    plan they were fitted to."""

    plan: TrainingPlan
    speed: SpeedSettings
    memory: MemoryPlan


def node_speed(
    spec: FineTuneJobSpec,
    cuda: bool,
    *,
    varlen_runs: bool | None = None,
    fp8_runs: bool | None = None,
) -> SpeedSettings:
    """The spec's speed settings as this node can run them (a preference run's restrictions
    applied); InvalidConfig for what it can't. ``varlen_runs``, ``fp8_runs``: as
    :func:`~kubetune.trainer.plan.speed.resolve_speed` and
    :func:`~kubetune.trainer.plan.speed.resolve_fp8` take them."""
    from kubetune.trainer.plan import speed
    from kubetune.trainer.run import preference

    settings = speed.resolve_speed(spec.training, cuda, varlen_runs=varlen_runs)
    fp8 = speed.resolve_fp8(
        spec.quantization,
        cuda,
        fp8_runs=fp8_runs,
        preference=spec.method.preference,
        lora_dropout=spec.lora.dropout,
    )
    settings = replace(settings, fp8_matmuls=fp8)
    if spec.method.preference:
        settings = preference.preference_speed(settings)
    return settings


def fit_to_card(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    shape: ModelShape | None,
    *,
    cuda: bool,
    free_bytes: int | None = None,
) -> RunPlan:
    """The memory plan for ``shape`` on this node's GPU (or the CPU), the speed settings with its
    choices, and the batch re-split into the plan's micro-batches (the batch a device trains per
    optimizer step is kept). OutOfMemory, naming the knob, for a run whose leanest plan needs
    more than the card has free. ``free_bytes``: the card's free memory (read from CUDA when not
    given, within this process's memory cap if it has one:
    :func:`~kubetune.trainer.plan.card.usable_gpu_bytes`)."""
    from kubetune.trainer.plan import speed as speed_module
    from kubetune.trainer.plan.card import usable_gpu_bytes

    training = spec.training
    per_device = plan.micro_batch_size * plan.gradient_accumulation_steps
    chosen = (
        training.micro_batch_size is not None or training.gradient_accumulation_steps is not None
    )
    free = free_bytes
    if cuda and free is None:
        free = usable_gpu_bytes()
    if shape is None:
        memory = _plan_without_shape(spec, plan, speed, free, cuda=cuda, chosen=chosen)
    else:
        # A DPO pair is two sequences in the same micro-batch: the plan sees it as one of twice
        # the length (activations grow with the tokens); the reference pass keeps nothing for
        # backward.
        run = RunSettings(
            max_length=training.max_length * sequences_per_example(spec.method),
            per_device_batch=per_device,
            lora_rank=spec.lora.r,
            lora_dropout=spec.lora.dropout,
            liger_kernel=speed.liger_kernel,
            micro_batch_size=plan.micro_batch_size if chosen else None,
            gradient_checkpointing=training.gradient_checkpointing,
            optimizer=training.optimizer,
            profile=training.profile,
            fp8_matmuls=speed.fp8_matmuls,
            fp8_min_tokens=FP8_MIN_TOKENS if spec.quantization.fp8_matmuls == "auto" else 0,
        )
        memory = plan_memory(shape, run, free, cuda=cuda)
        fewest = fewest_per_micro_batch(spec.method)
        if memory.micro_batch_size < fewest <= per_device:
            memory = plan_memory(shape, replace(run, micro_batch_size=fewest), free, cuda=cuda)
        _refuse_what_cannot_fit(memory, shape, run, free, cuda=cuda, max_length=training.max_length)
    resplit = plan.model_copy(
        update={
            "micro_batch_size": memory.micro_batch_size,
            "gradient_accumulation_steps": per_device // memory.micro_batch_size,
        }
    )
    return RunPlan(plan=resplit, speed=speed_module.apply_plan(speed, memory), memory=memory)


def _plan_without_shape(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    free: int | None,
    *,
    cuda: bool,
    chosen: bool,
) -> MemoryPlan:
    """A model of unknown shape: what the spec says, no estimate; on a GPU, checkpointing when
    unset. ``chosen``: the spec sets the micro-batch or the accumulation."""
    training = spec.training
    checkpointing = training.gradient_checkpointing
    if checkpointing is None:
        checkpointing = cuda or training.profile == "memory"
    micro = plan.micro_batch_size
    if training.profile == "memory" and not chosen:
        per_device = plan.micro_batch_size * plan.gradient_accumulation_steps
        micro = min(fewest_per_micro_batch(spec.method), per_device)
    return MemoryPlan(
        checkpointed_layers=1 if checkpointing else 0,
        layers=1,
        micro_batch_size=micro,
        tokens_per_micro_step=micro * training.max_length * sequences_per_example(spec.method),
        optimizer=speed.optimizer,
        estimated_peak_bytes=None,
        free_bytes=free,
        profile=training.profile,
        fp8_matmuls=speed.fp8_matmuls,
    )


def _refuse_what_cannot_fit(
    memory: MemoryPlan,
    shape: ModelShape,
    run: RunSettings,
    free: int | None,
    *,
    cuda: bool,
    max_length: int,
) -> None:
    """OutOfMemory for a plan that can't fit: naming training.profile where the memory profile
    would fit, else training.maxLength (``max_length``, the spec's); a warning where it may not
    fit."""
    if not memory.fits and run.profile == "speed":
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
            knob = f"training.maxLength (now {max_length})"
            raise OutOfMemory(f"{message}; lower {knob} or use a larger GPU")
        log.warning("%s: it may not fit", message)
