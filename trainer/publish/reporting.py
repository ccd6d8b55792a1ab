"""What a finished run reports about itself: its metrics over every attempt, and the settings it
actually ran with (for the model card). Pure: data in, data out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune.api.models import TrainingPlan
    from kubetune.trainer.plan.memory import MemoryPlan
    from kubetune.trainer.plan.speed import SpeedSettings


def run_metrics(
    global_step: int,
    *,
    resumed_from_step: int | None,
    trained: dict[str, float],
    earlier_train_seconds: float,
    final_loss: float | None,
    tokens_per_second: float | None,
) -> dict[str, float]:
    """The run's metrics, over every attempt: the Trainer's train_loss already is (resume
    restores its running totals); its runtime and throughput are this attempt's, and are
    extended here by the training time the checkpoint carries."""
    metrics = {"steps": float(global_step)}
    if resumed_from_step is not None:
        # A preempted run says where it picked up, so a retried pod is seen to continue.
        metrics["resumed_from_step"] = float(resumed_from_step)
    if "train_loss" in trained:
        metrics["train_loss"] = round(trained["train_loss"], 6)
    if "train_runtime" in trained:
        attempt = trained["train_runtime"]
        runtime = earlier_train_seconds + attempt
        metrics["train_runtime"] = round(runtime, 6)
        if "train_samples_per_second" in trained and runtime > 0:
            samples = trained["train_samples_per_second"] * attempt
            metrics["train_samples_per_second"] = round(samples / runtime, 6)
    if final_loss is not None:
        metrics["final_loss"] = final_loss
    if tokens_per_second is not None:
        metrics["tokens_per_second"] = tokens_per_second
    return metrics


def effective_settings(
    steps: int, plan: TrainingPlan, speed: SpeedSettings, memory: MemoryPlan | None
) -> dict[str, Any]:
    """The settings the run had after every ``auto`` was decided, as the model card lists them."""
    return {
        "steps": steps,
        "micro batch x accumulation": (
            f"{plan.micro_batch_size} x {plan.gradient_accumulation_steps}"
        ),
        "attention": speed.attention,
        "packing (padding-free)": speed.packing,
        "liger kernel": speed.liger_kernel,
        "gradient checkpointing": (
            memory.describe_checkpointing() if memory is not None else speed.gradient_checkpointing
        ),
        "tokens per micro-step": memory.tokens_per_micro_step if memory else None,
        "padded to one shape": speed.pad_to_tokens is not None,
        "optimizer": speed.optimizer,
        "profile": memory.profile if memory is not None else "speed",
        "checkpoints offloaded to CPU": speed.offload_checkpoints,
    }
