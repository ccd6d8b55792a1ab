"""This card, as the memory plan sees it: its free memory within this process's cap (what only
the node knows, for ``resolve.fit_to_card``), and the plan as the result reports it, with the
peak measured so far."""

from __future__ import annotations

from kubetune.api.models import MemoryPlanReport, TrainingPlan
from kubetune.trainer.plan.memory import GIB, MemoryPlan


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
