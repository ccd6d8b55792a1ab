"""The run's TRL trainer, put together: the 4-bit base, the arguments and TRL's trainer, resumable.

The base is loaded with the adapter it continues (``model.adapter``) or a new LoRA config; the
arguments are SFTConfig's, DPOConfig's or KTOConfig's; the trainer carries the callbacks every run
has (progress, checkpoints, divergence, partial checkpointing) and fused LoRA layers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.trainer.errors import DatasetUnusable, InvalidConfig
from kubetune.trainer.plan.arguments import LossMasking, preference_arguments, sft_arguments

if TYPE_CHECKING:
    from kubetune.api.models import FineTuneJobSpec, TrainingPlan
    from kubetune.trainer.dataset.formats import PreparedData
    from kubetune.trainer.model.starting_adapter import StartingAdapter
    from kubetune.trainer.plan.arguments import RunArguments
    from kubetune.trainer.plan.speed import SpeedSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """The base in 4-bit, ready for TRL: ``peft_config`` None when ``model`` already carries the
    adapter it continues (``starting``)."""

    model: Any
    peft_config: Any
    starting: StartingAdapter | None


def starting_adapter(
    spec: FineTuneJobSpec, located: tuple[str, bool], token: str | None
) -> StartingAdapter:
    """spec.model.adapter, fetched and checked against the spec and the base's config."""
    from kubetune.trainer.model.modeling import base_config
    from kubetune.trainer.model.starting_adapter import check_adapter, locate_adapter

    assert spec.model.adapter is not None
    source, is_hub = located
    adapter = locate_adapter(spec.model.adapter, token)
    check_adapter(adapter, spec, base_config(source, spec.model, is_hub, token))
    return adapter


def load_model(
    spec: FineTuneJobSpec,
    speed: SpeedSettings,
    located: tuple[str, bool],
    *,
    token: str | None,
    cuda: bool,
) -> LoadedModel:
    """The 4-bit base with the LoRA targets checked; a starting adapter is fetched and checked
    before the weights load (a wrong adapter costs no model load) and loaded trainable."""
    from kubetune.trainer.model.modeling import (
        check_lora_targets,
        load_quantized_model,
        lora_config,
        offload_checkpoints_to_cpu,
    )

    source, is_hub = located
    starting = None
    if spec.model.adapter is not None:
        starting = starting_adapter(spec, located, token)
    model = load_quantized_model(
        source,
        spec=spec.model,
        quantization=spec.quantization,
        speed=speed,
        is_hub=is_hub,
        token=token,
        cuda=cuda,
    )
    check_lora_targets(model, spec.lora)
    peft_config: Any = lora_config(spec.lora)
    if starting is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(starting.path), is_trainable=True)
        peft_config = None
        log.info("continuing the adapter %s", starting.shown)
    if speed.offload_checkpoints:
        offload_checkpoints_to_cpu(model, pin_memory=cuda)
    return LoadedModel(model, peft_config, starting)


def trainer_arguments(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    data: PreparedData,
    run: RunArguments,
) -> dict[str, Any]:
    """The arguments of the run's TRL trainer: SFTConfig's, or for preference tuning DPOConfig's
    or KTOConfig's (kubetune.trainer.plan.arguments)."""
    if spec.method.preference:
        return preference_arguments(spec, plan, speed, run, has_eval=data.eval is not None)
    masking = LossMasking(
        completion_only=data.completion_only_loss,
        assistant_only=data.assistant_only_loss,
        has_eval=data.eval is not None,
    )
    return sft_arguments(spec, plan, speed, run, masking)


def trl_trainer(
    spec: FineTuneJobSpec,
    plan: TrainingPlan,
    speed: SpeedSettings,
    data: PreparedData,
    *,
    run: RunArguments,
    common: dict[str, Any],
) -> Any:
    """TRL's SFTTrainer, or DPOTrainer or KTOTrainer whose reference is the base with the adapter
    disabled (kubetune.trainer.run.preference); resumable (kubetune.trainer.run.resume)."""
    from kubetune.trainer.model.modeling import check_optimizer_runs_here
    from kubetune.trainer.run.resume import resumable_preference_trainer, resumable_sft_trainer

    arguments = trainer_arguments(spec, plan, speed, data, run)
    method = spec.method.type
    if not spec.method.preference:
        from trl import SFTConfig

        config = SFTConfig(**arguments)
        check_optimizer_runs_here(config, common["model"], speed.optimizer)
        return resumable_sft_trainer(args=config, **common)
    from trl import DPOConfig, KTOConfig

    config = DPOConfig(**arguments) if method == "dpo" else KTOConfig(**arguments)
    check_optimizer_runs_here(config, common["model"], speed.optimizer)
    try:
        with warnings.catch_warnings():
            # TRL 1.x marks use_liger_kernel deprecated in its preference trainers (for v2) but
            # applies Liger's layer kernels as before: nothing for a job's log.
            warnings.filterwarnings(
                "ignore", r"`use_liger_kernel=True` is deprecated", FutureWarning
            )
            trainer = resumable_preference_trainer(method, args=config, **common)
    except ValueError as exc:
        # TRL's refusals of a setting (an lm_head adapter, KTO's micro-batch of one).
        raise InvalidConfig(f"spec.method: {exc}") from None
    if method == "dpo" and speed.attention == "varlen":
        from kubetune.trainer.model.packed_pairs import pack_padded_pairs

        pack_padded_pairs(trainer.model.get_base_model())
        log.info("DPO micro-batches run unpadded (varlen attention)")
    return trainer


def finish_trainer(trainer: Any, spec: FineTuneJobSpec, speed: SpeedSettings) -> None:
    """The adapted layers fused, partial checkpointing and the divergence check added; a
    dataset TRL's preparation left empty refused."""
    from kubetune.trainer.model.fused_lora import (
        fuse_lora_layers,
        keep_dequantization,
        kept_dequantization_dropped_after_training,
        use_fp8_matmuls,
    )
    from kubetune.trainer.model.modeling import partial_checkpointing_callback
    from kubetune.trainer.run.divergence import divergence_callback

    fused = fuse_lora_layers(trainer.model)
    if fused:
        log.info("%d adapted 4-bit layers compute base and LoRA in one function", fused)
        if speed.kept_dequantization != "none":
            kept = keep_dequantization(trainer.model, speed.kept_dequantization)
            log.info("%d of them keep their dequantised %s", kept, speed.kept_dequantization)
            trainer.add_callback(kept_dequantization_dropped_after_training())
        if speed.fp8_matmuls:
            log.info("%d of them run the base's matmuls in FP8", use_fp8_matmuls(trainer.model))
            from kubetune.trainer.model import grouped_lora

            if grouped_lora.GROUP_SIBLINGS:
                grouped = grouped_lora.group_siblings(trainer.model)
                log.info(
                    "%d sets of them that read one input (q, k, v; gate, up) run as one", grouped
                )
    if speed.gradient_checkpointing and speed.checkpointed_layers is not None:
        trainer.add_callback(partial_checkpointing_callback(speed.checkpointed_layers))
    trainer.add_callback(divergence_callback(spec, lambda: getattr(trainer, "_tr_loss", None)))
    if len(trainer.train_dataset) == 0:
        from kubetune.trainer.dataset.formats import no_examples_left

        raise DatasetUnusable(no_examples_left(spec.training.max_length))
