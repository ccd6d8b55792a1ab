"""The run's plan, resolved once for this node: speed settings, memory plan, micro-batches.

Every ``auto`` of the speed settings, then the memory plan for this card (checkpointing, tokens
per micro-step, the optimizer) and the micro-batch re-split that keeps the batch. The recipe, the
preflight and every rank of a distributed run go through here.

Who decides what, in this order: :func:`node_speed` turns ``attention``, ``ligerKernel`` and
``packing`` into what this node runs and refuses what it can't (before anything heavy loads);
``optimizer`` and ``gradientCheckpointing`` stay provisional there (``auto`` → the node's
leanest choice, unset → off) until :func:`fit_to_card`, where the memory plan
(:func:`~kubetune.trainer.plan.card.plan_for_this_card`) takes them and
:func:`~kubetune.trainer.plan.speed.apply_plan` writes them into the speed settings the trainer's
arguments are built from. One plan, reported as ``MemoryPlanReport`` (result.json, the status)
and ``EstimatePlan`` (the preflight's estimate): both are read off the :class:`RunPlan`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune.trainer.errors import InvalidConfig

if TYPE_CHECKING:
    from kubetune.api.models import FineTuneJobSpec, TrainingPlan
    from kubetune.trainer.plan.memory import MemoryPlan, ModelShape
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
    spec: FineTuneJobSpec, cuda: bool, *, varlen_runs: bool | None = None
) -> SpeedSettings:
    """The spec's speed settings as this node can run them (a preference run's restrictions
    applied); InvalidConfig for what it can't. ``varlen_runs``: as
    :func:`~kubetune.trainer.plan.speed.resolve_speed` takes it."""
    from kubetune.trainer.plan import speed
    from kubetune.trainer.run import preference

    settings = speed.resolve_speed(spec.training, cuda, varlen_runs=varlen_runs)
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
    """The memory plan for ``shape`` on this card (``free_bytes`` as
    :func:`~kubetune.trainer.plan.card.plan_for_this_card` takes it), the speed settings with its
    choices, and the batch re-split into the plan's micro-batches (the batch a device trains
    per optimizer step is kept)."""
    from kubetune.trainer.plan import speed as speed_module
    from kubetune.trainer.plan.card import plan_for_this_card

    memory = plan_for_this_card(spec, plan, speed, shape, cuda, free_bytes=free_bytes)
    per_device = plan.micro_batch_size * plan.gradient_accumulation_steps
    resplit = plan.model_copy(
        update={
            "micro_batch_size": memory.micro_batch_size,
            "gradient_accumulation_steps": per_device // memory.micro_batch_size,
        }
    )
    return RunPlan(plan=resplit, speed=speed_module.apply_plan(speed, memory), memory=memory)
