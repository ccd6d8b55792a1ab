"""This card, as the memory plan sees it: its free memory within this process's cap (what only
the node knows, for ``resolve.fit_to_card``), and the plan as the preflight's estimate and the
result report it, with the peak measured so far."""

from __future__ import annotations

from kubetune.api.models import EstimatePlan, MemoryPlanReport, TrainingPlan
from kubetune.trainer.plan.memory import GIB, MemoryPlan
from kubetune.trainer.plan.speed import CONTEXT_BYTES


def capped_free_bytes(free: int, total: int, fraction: float, reserved: int) -> int:
    """What this process may still allocate on a card with ``free`` bytes free of ``total``, when
    its allocator is capped to ``fraction`` of the card (``set_per_process_memory_fraction``:
    a GPU shared by several pods, or a benchmark standing in for a smaller card) and already
    holds ``reserved`` bytes.

    Uncapped, it is the card's memory less what the CUDA context and libraries hold
    (``speed.CONTEXT_BYTES``), or less where less is free (a card shared with other processes):
    CUDA's free memory alone moves by up to 0.8 GiB from one process to the next on one card,
    and the plan's choices (the optimizer of a 7B run on an 80 GB card) moved with it."""
    if fraction >= 1.0:
        return max(0, min(free, total - CONTEXT_BYTES - reserved))
    return max(0, min(free, int(total * fraction) - reserved))


def usable_gpu_bytes() -> int:
    """This card's free memory as the plan may fill it: CUDA's free memory, or less where this
    process's allocator is capped."""
    import torch

    free, total = torch.cuda.mem_get_info()
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(getter()) if getter is not None else 1.0
    return capped_free_bytes(int(free), int(total), fraction, int(torch.cuda.memory_reserved()))


def plan_settings(memory: MemoryPlan, plan: TrainingPlan) -> EstimatePlan:
    """What the plan sets for the run: the preflight's estimate shows these, the result more."""
    return EstimatePlan(
        micro_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        gradient_checkpointing=memory.describe_checkpointing(),
        optimizer=memory.optimizer,
    )


def plan_report(memory: MemoryPlan, plan: TrainingPlan, cuda: bool) -> MemoryPlanReport:
    """The memory plan as result.json and the status show it: its settings, what it expected of
    the card, and the peak measured so far."""
    peak = None
    if cuda:
        import torch

        peak = torch.cuda.max_memory_allocated()
    return MemoryPlanReport(
        **plan_settings(memory, plan).model_dump(),
        tokens_per_micro_step=memory.tokens_per_micro_step,
        profile=memory.profile,
        checkpoints_offloaded=memory.offload_checkpoints,
        estimated_peak_gib=_gib(memory.estimated_peak_bytes),
        free_gib=_gib(memory.free_bytes),
        peak_gib=_gib(peak),
        fp8_matmuls=memory.fp8_matmuls,
    )


def _gib(size: int | None) -> float | None:
    return round(size / GIB, 2) if size is not None else None
