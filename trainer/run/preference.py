"""Preference tuning (``spec.method``: dpo, kto) on the same QLoRA path: what differs from SFT.

TRL's DPOTrainer and KTOTrainer train the same 4-bit base and LoRA adapter as SFTTrainer; their
reference model is that base with the adapter disabled (TRL's choice for a PEFT model without a
``ref_model``), so no second copy of the weights is loaded. What changes is the shape of a step: a
DPO example is two sequences (prompt + chosen, prompt + rejected) padded in one batch, each step
runs a reference forward pass without gradients beside the trained one (KTO also runs the policy
and the reference over a mismatched "KL" completion per example, without gradients), and examples
are never packed together (TRL's preference collators pad each micro-batch; on a GPU
kubetune.trainer.model.packed_pairs then runs a DPO micro-batch's real tokens as one row). The
memory plan, the time estimate and the speed settings take that into account here; the logged
reward metrics get their status names here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kubetune.api.models import MethodSpec

if TYPE_CHECKING:
    from kubetune.trainer.plan.shape import ModelShape
    from kubetune.trainer.plan.speed import SpeedSettings

#: TRL's logged preference metrics → the names status.progress and status.result use.
REWARD_METRICS = {
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "chosen_reward",
    "rewards/rejected": "rejected_reward",
}


def sequences_per_example(method: MethodSpec) -> int:
    """Sequences one example puts through the trained forward pass (a DPO pair: two)."""
    return 2 if method.type == "dpo" else 1


def fewest_per_micro_batch(method: MethodSpec) -> int:
    """The smallest micro-batch the method trains on: KTO's ``kto`` loss estimates its KL term
    from the other examples of the micro-batch, so it needs two (TRL refuses one)."""
    return 2 if method.type == "kto" and method.kto_settings.loss_type == "kto" else 1


def extra_forward_passes(method: MethodSpec) -> int:
    """Forward passes without gradients per trained sequence: the reference pass; KTO's KL term
    adds the policy's and the reference's over the mismatched completion."""
    if method.type == "sft":
        return 0
    if method.type == "kto" and method.kto_settings.loss_type == "kto":
        return 3
    return 1


def preference_speed(speed: SpeedSettings) -> SpeedSettings:
    """The speed settings a preference run can use: no packing of examples into rows and no
    bucketing (TRL's preference collators pad each micro-batch); varlen attention stays where it
    runs, for DPO's micro-batches unpadded by kubetune.trainer.model.packed_pairs (any padded call
    falls back to SDPA), flex attention becomes SDPA. Liger stays as resolved: TRL's preference
    trainers apply its layer kernels (RMSNorm, SwiGLU, RoPE) and keep their own fused LM head
    instead of Liger's fused cross-entropy; without them a DPO step of the 7B benchmark took
    ~1.85 s against TRL's ~1.0 s with them (docs/performance.md)."""
    attention = "sdpa" if speed.attention == "flex_attention" else speed.attention
    return replace(speed, packing=False, attention=attention, pad_to_tokens=None)


def reward_metrics(logs: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The reward metrics of one log entry (``prefix``: ``eval_`` for an evaluation's), under
    status names, rounded."""
    found = {}
    for key, name in REWARD_METRICS.items():
        value = logs.get(prefix + key)
        if isinstance(value, (int, float)):
            found[prefix + name] = round(float(value), 6)
    return found


def work_per_token(shape: ModelShape, lora_rank: int, extra_forwards: int) -> float:
    """A trained token's FLOPs with ``extra_forwards`` forward passes without gradients beside
    it, relative to an SFT token's (``speed.flops_per_token``: 4 per frozen base weight, 6 per
    adapter weight; a forward pass is 2 per base weight)."""
    from kubetune.trainer.plan.speed import flops_per_token

    sft = flops_per_token(shape, lora_rank)
    return (sft + 2.0 * extra_forwards * shape.linear_params()) / sft
