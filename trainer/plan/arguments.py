"""The spec → trainer arguments mapping: pure functions, as TRL's ``sft.py`` maps its config.

``sft_arguments`` takes the spec, the training plan, the speed settings resolved for this node
and the run's own arguments (the device, the checkpoint folder, ...), and returns the keyword
arguments of TRL's ``SFTConfig`` as plain data. Nothing here imports torch or touches a file, so
every knob's mapping is tested in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.models import FineTuneJobSpec, TrainingPlan
from kubetune.trainer.plan.speed import SpeedSettings
from kubetune.trainer.run.checkpoints import CHECKPOINTS_KEPT
from kubetune.trainer.run.tracking import report_to

#: transformers reads a warmup below 1 as a fraction of the run, and 1.0 as one step.
_LAST_WARMUP_FRACTION = 0.999


@dataclass(frozen=True)
class RunArguments:
    """What the trainer's arguments take beyond the spec and the plan."""

    cuda: bool
    checkpoint_dir: str
    progress_bar: bool = False
    #: One rank of a group training data-parallel (the plan's batch is already per rank).
    distributed: bool = False
    run_name: str | None = None


@dataclass(frozen=True)
class LossMasking:
    """What the prepared data says about which tokens count in the loss, and whether an
    evaluation split exists (``PreparedData`` without the datasets)."""

    completion_only: bool
    assistant_only: bool
    has_eval: bool


def sft_arguments(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    run: RunArguments,
    masking: LossMasking,
) -> dict[str, Any]:
    """The keyword arguments of ``trl.SFTConfig`` for one run (of one rank, where
    ``run.distributed``)."""
    training = spec.training
    compute = spec.quantization.compute_dtype
    every = training.checkpoint_steps
    return {
        "output_dir": run.checkpoint_dir,
        "num_train_epochs": plan.epochs if plan.epochs is not None else 1.0,
        "max_steps": plan.max_steps if plan.max_steps is not None else -1,
        "per_device_train_batch_size": plan.micro_batch_size,
        "per_device_eval_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler,
        "warmup_steps": min(training.warmup_ratio, _LAST_WARMUP_FRACTION),
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "seed": training.seed,
        "data_seed": training.seed,
        "optim": speed.optimizer,
        # bf16 autocast runs on the CPU too; fp16 autocast needs CUDA (a CPU run keeps fp32
        # activations around the fp16 4-bit matmuls).
        "bf16": compute == "bfloat16",
        "fp16": compute == "float16" and run.cuda,
        "use_cpu": not run.cuda,
        "max_length": training.max_length,
        "packing": speed.packing,
        "padding_free": speed.packing,
        "use_liger_kernel": speed.liger_kernel,
        "gradient_checkpointing": speed.gradient_checkpointing,
        # A plan that checkpoints some layers only turns the rest off when training begins
        # (modeling.partial_checkpointing_callback).
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "pad_to_multiple_of": speed.pad_to_tokens,
        "completion_only_loss": masking.completion_only,
        "assistant_only_loss": masking.assistant_only,
        "logging_steps": training.logging_steps,
        # The Trainer would log a NaN or inf step loss as the interval's average so far, hiding
        # the divergence that the recipe stops the run for.
        "logging_nan_inf_filter": False,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": every,
        "save_total_limit": CHECKPOINTS_KEPT,
        "eval_strategy": "steps" if masking.has_eval else "no",
        "eval_steps": every if masking.has_eval else None,
        # spec.tracking through transformers' own MLflow and TensorBoard callbacks (configured
        # by the environment, kubetune.trainer.run.tracking); nothing else installed reports.
        "report_to": report_to(spec.tracking),
        "run_name": run.run_name,
        "disable_tqdm": not run.progress_bar,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
        # LoRA trains every adapter on every step: DDP need not search the graph for unused
        # parameters (a pass over it per step, and incompatible with checkpointing's re-entry).
        **({"ddp_find_unused_parameters": False} if run.distributed else {}),
    }


#: SFTConfig settings that TRL's preference configs don't have, or that kubetune doesn't use
#: there (their collators pad).
_SFT_ONLY = ("packing", "padding_free", "completion_only_loss", "assistant_only_loss")


def preference_arguments(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    run: RunArguments,
    *,
    has_eval: bool,
) -> dict[str, Any]:
    """The keyword arguments of ``trl.DPOConfig`` (``spec.method.type`` dpo) or
    ``trl.KTOConfig`` (kto): the same training settings as SFT, and the method's own."""
    masking = LossMasking(completion_only=False, assistant_only=False, has_eval=has_eval)
    arguments = sft_arguments(spec, plan, speed, run, masking)
    for key in _SFT_ONLY:
        arguments.pop(key)
    # use_liger_kernel: TRL's preference trainers apply Liger's layer kernels only (RMSNorm,
    # SwiGLU, RoPE), keeping their fused LM head (kubetune.trainer.run.preference.preference_speed).
    arguments.update(pad_to_multiple_of=None)
    method = spec.method
    if method.type == "dpo":
        dpo = method.dpo_settings
        arguments.update(
            beta=dpo.beta, loss_type=[dpo.loss_type], label_smoothing=dpo.label_smoothing
        )
    elif method.type == "kto":
        kto = method.kto_settings
        arguments.update(
            beta=kto.beta,
            loss_type=kto.loss_type,
            desirable_weight=kto.desirable_weight,
            undesirable_weight=kto.undesirable_weight,
        )
    else:
        raise ValueError(f"method.type {method.type} is not preference tuning")
    return arguments
