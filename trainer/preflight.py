"""``kubetune-trainer preflight``: check the data and estimate the run, before any GPU is asked for.

The Validating phase's CPU pod runs this with the training run's own config. It goes through the
same code the run goes through, up to where the run would load the weights: the tokenizer and
the model's config (:mod:`~kubetune.trainer.modeling`), the data read, checked and shaped
(:func:`~kubetune.trainer.data.prepare`), the SFT arguments
(:func:`~kubetune.trainer.arguments.sft_arguments`) and TRL's own dataset preparation
(tokenizing, truncating, packing: ``SFTTrainer._prepare_dataset``), and the memory plan
(:func:`~kubetune.trainer.planning.plan_for_this_card`) for ``validation.gpuKind``. Steps are
counted the way transformers' Trainer counts them from the prepared rows, and seconds come from the
measured speed table (:data:`~kubetune.trainer.speed.GPU_KINDS`). A problem is the same
DatasetUnusable / ModelUnusable / OutOfMemory the run would end in, minutes and a GPU later.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import Reason
from kubetune.api.models import (
    BaseModelRef,
    Estimate,
    EstimatePlan,
    TrainerResult,
    TrainingPlan,
    plan_training,
)
from kubetune.api.uris import display_uri
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig
from kubetune.trainer.memory import GIB, MemoryPlan
from kubetune.trainer.preference import (
    extra_forward_passes,
    preference_speed,
    work_per_token,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.data import PreparedData
    from kubetune.trainer.speed import SpeedSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counts:
    """What one epoch of prepared training data holds."""

    examples: int
    #: Rows the Trainer iterates (packed rows with packing, examples without).
    sequences: int
    tokens: int
    sampled: bool = False


def optimizer_steps(sequences: int, plan: TrainingPlan, ranks: int) -> tuple[int, int]:
    """(steps of the run, steps per epoch), as transformers' Trainer computes them
    (``Trainer.set_initial_training_values``): each rank iterates ``ceil(batches / ranks)``
    micro-batches (accelerate's even batches), an epoch is ``ceil(that / accumulation)``
    optimizer steps (at least one), and the run ``maxSteps`` or ``ceil(epochs x that)``."""
    batches = math.ceil(sequences / plan.micro_batch_size)
    per_rank = math.ceil(batches / max(ranks, 1))
    per_epoch = max(math.ceil(per_rank / plan.gradient_accumulation_steps), 1)
    if plan.max_steps is not None:
        return plan.max_steps, per_epoch
    return math.ceil((plan.epochs or 1.0) * per_epoch), per_epoch


def extrapolate(sample: Counts, examples: int) -> Counts:
    """Counts for ``examples`` examples from those of a sample of them."""
    factor = examples / sample.examples
    return Counts(
        examples=examples,
        sequences=max(round(sample.sequences * factor), 1),
        tokens=round(sample.tokens * factor),
        sampled=True,
    )


def trl_prepared(dataset: Dataset, tokenizer: Any, arguments: dict[str, Any]) -> Dataset:
    """``dataset`` as SFTTrainer prepares it for training (tokenized, labelled, truncated or
    packed), through TRL's own ``_prepare_dataset``, without a model: the three attributes it
    reads are set the way ``SFTTrainer.__init__`` sets them for the run's arguments."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**arguments)

    class _DatasetOnly(SFTTrainer):  # type: ignore[misc]
        def __init__(self) -> None:  # no model, no accelerator: only what preparation reads
            self._tokenizer = tokenizer
            # SFTTrainer swaps in a training template only for assistant-only loss without
            # generation markers, which the data module never asks for.
            self.chat_template = None
            self.completion_only_loss = args.completion_only_loss

    prepared: Dataset = _DatasetOnly()._prepare_dataset(
        dataset, tokenizer, args, args.packing, None, "train"
    )
    return prepared


def trl_preference_prepared(
    method: str, dataset: Dataset, tokenizer: Any, arguments: dict[str, Any]
) -> Dataset:
    """``dataset`` as DPOTrainer (``method`` dpo) or KTOTrainer (kto) prepares it (prompt and
    answers tokenized, examples whose prompt fills maxLength dropped; for KTO pairs unpaired and
    the KL completions added), through TRL's own ``_prepare_dataset``, without a model: the
    attributes it reads are set the way the trainers' ``__init__`` sets them."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    if method == "dpo":
        dpo_args = DPOConfig(**arguments)

        class _DpoDatasetOnly(DPOTrainer):  # type: ignore[misc]
            def __init__(self) -> None:  # no model, no accelerator: only what preparation reads
                self._tokenizer = tokenizer

        prepared: Dataset = _DpoDatasetOnly()._prepare_dataset(
            dataset, tokenizer, dpo_args, "train"
        )
        return prepared
    kto_args = KTOConfig(**arguments)

    class _KtoDatasetOnly(KTOTrainer):  # type: ignore[misc]
        def __init__(self) -> None:
            self._tokenizer = tokenizer
            self.calculate_KL = kto_args.loss_type != "apo_zero_unpaired"
            self.desirable_weight = kto_args.desirable_weight
            self.undesirable_weight = kto_args.undesirable_weight

    prepared = _KtoDatasetOnly()._prepare_dataset(dataset, tokenizer, kto_args, "train")
    return prepared


def count_preference(prepared: Dataset, examples: int, max_length: int) -> Counts:
    """Counts of preference data as the trainer sees it: a DPO pair's tokens are those of
    prompt + chosen and prompt + rejected, each cut to ``max_length`` (the collator's
    truncation); a KTO example's, prompt + completion cut the same way."""
    answers = [
        c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in prepared.column_names
    ]

    def tokens(row: dict[str, Any]) -> dict[str, int]:
        prompt = len(row["prompt_ids"])
        return {"n": sum(min(prompt + len(row[a]), max_length) for a in answers)}

    lengths = prepared.map(tokens, remove_columns=prepared.column_names)["n"]
    return Counts(examples=examples, sequences=len(prepared), tokens=int(sum(lengths)))


def count(prepared: Dataset, examples: int) -> Counts:
    lengths = prepared.map(
        lambda row: {"n": len(row["input_ids"])}, remove_columns=prepared.column_names
    )["n"]
    return Counts(examples=examples, sequences=len(prepared), tokens=int(sum(lengths)))


def preflight(config: TrainerConfig, read_token: str | None = None) -> TrainerResult:
    """Check and estimate the run ``config`` describes; raises the run's own failures."""
    from kubetune.trainer import varlen_attention
    from kubetune.trainer.data import no_examples_left, prepare
    from kubetune.trainer.modeling import load_tokenizer, locate_model, model_shape
    from kubetune.trainer.planning import plan_for_this_card
    from kubetune.trainer.speed import (
        apply_plan,
        estimated_seconds,
        gpu_free_bytes,
        resolve_speed,
    )

    spec = config.spec
    ranks = spec.resources.world_size
    try:
        plan = plan_training(spec.training, ranks)
    except ValueError as exc:
        raise InvalidConfig(str(exc)) from None
    kind = spec.validation.gpu_kind
    # The run's node: a GPU when the spec asks for one (the speed settings it will resolve).
    cuda = spec.resources.gpus > 0
    # The GPU kinds kubetune plans for all run FlashAttention-2 (compute capability >= 8.0).
    speed = resolve_speed(spec.training, cuda, varlen_runs=cuda and varlen_attention.available())
    method = spec.method
    if method.preference:
        speed = preference_speed(speed)

    source, is_hub = locate_model(spec.model)
    tokenizer = load_tokenizer(source, spec.model, is_hub, read_token, spec.dataset.chat_template)
    shape = model_shape(source, spec.model, is_hub, read_token)
    if spec.output.is_oci:
        _check_registry_push(spec)
    if spec.model.adapter is not None:
        # A starting adapter that doesn't fit fails here, before a GPU is asked for.
        from kubetune.trainer.modeling import base_config
        from kubetune.trainer.starting_adapter import check_adapter, locate_adapter

        adapter = locate_adapter(spec.model.adapter, read_token)
        check_adapter(adapter, spec, base_config(source, spec.model, is_hub, read_token))
    free = gpu_free_bytes(kind) if cuda and kind is not None else None
    # Without a card to plan for, the plan a node with unknown free memory makes (this pod has
    # no CUDA to ask).
    memory = plan_for_this_card(
        spec, plan, speed, shape, cuda and free is not None, free_bytes=free
    )
    speed = apply_plan(speed, memory)
    per_device = plan.micro_batch_size * plan.gradient_accumulation_steps
    plan = plan.model_copy(
        update={
            "micro_batch_size": memory.micro_batch_size,
            "gradient_accumulation_steps": per_device // memory.micro_batch_size,
        }
    )

    data = prepare(
        spec.dataset,
        chat_template=tokenizer.chat_template,
        seed=spec.training.seed,
        token=read_token,
        method=method.type,
    )
    examples = len(data.train)
    limit = spec.validation.max_sample_records
    train = data.train
    if examples > limit:
        log.info("tokenizing a sample of %d of the %d examples", limit, examples)
        train = train.shuffle(seed=spec.training.seed).select(range(limit))
    with tempfile.TemporaryDirectory(prefix="kubetune-preflight-") as scratch:
        if method.preference:
            prepared = _preference_prepared(
                spec, train, tokenizer, plan=plan, speed=speed, scratch=scratch, data=data
            )
        else:
            prepared = _sft_prepared(
                spec, train, tokenizer, plan=plan, speed=speed, scratch=scratch, data=data
            )
    if len(prepared) == 0:
        raise DatasetUnusable(no_examples_left(spec.training.max_length))
    if method.preference:
        counts = count_preference(prepared, len(train), spec.training.max_length)
    else:
        counts = count(prepared, len(train))
    if len(train) < examples:
        counts = extrapolate(counts, examples)
    steps, per_epoch = optimizer_steps(counts.sequences, plan, ranks)
    trained_tokens = round(counts.tokens * steps / per_epoch)
    seconds = None
    if kind is not None and shape is not None and cuda:
        # The reference pass (and KTO's KL passes) cost forward FLOPs on top of the trained ones.
        tokens_of_work = round(
            trained_tokens * work_per_token(shape, spec.lora.r, extra_forward_passes(method))
        )
        seconds = estimated_seconds(
            kind, shape, lora_rank=spec.lora.r, plan=memory, tokens=tokens_of_work, ranks=ranks
        )
    estimate = Estimate(
        examples=counts.examples,
        tokens=counts.tokens,
        sequences=counts.sequences,
        steps=steps,
        plan=_plan_of(memory, plan),
        gpu_kind=kind if cuda else None,
        peakGiB=(
            round(memory.estimated_peak_bytes / GIB, 1)
            if memory.estimated_peak_bytes is not None
            else None
        ),
        seconds=round(seconds) if seconds is not None else None,
        sampled=counts.sampled,
    )
    message = _describe(estimate, method.type)
    log.info("preflight: %s", message)
    return TrainerResult(
        outcome="Succeeded",
        reason=Reason.VALIDATED,
        message=message,
        base_model=BaseModelRef(uri=display_uri(spec.model.uri), revision=spec.model.revision),
        dataset_fingerprint=data.fingerprint,
        estimate=estimate,
    )


#: Settings only the training loop reads, set so this CPU pod can build the config.
_LOOP_ONLY = {
    "bf16": False,
    "fp16": False,
    "use_liger_kernel": False,
    "optim": "adamw_torch",
    "gradient_checkpointing": False,
    "pad_to_multiple_of": None,
}


def _sft_prepared(
    spec: FineTuneJobSpec,
    train: Dataset,
    tokenizer: Any,
    *,
    plan: TrainingPlan,
    speed: SpeedSettings,
    scratch: str,
    data: PreparedData,
) -> Dataset:
    from kubetune.trainer.arguments import LossMasking, sft_arguments

    arguments = sft_arguments(
        spec,
        plan,
        speed,
        cuda=False,  # this pod's device; what prepares the data doesn't depend on it
        checkpoint_dir=scratch,
        masking=LossMasking(
            completion_only=data.completion_only_loss,
            assistant_only=data.assistant_only_loss,
            has_eval=data.eval is not None,
        ),
    )
    arguments.update(_LOOP_ONLY)
    return trl_prepared(train, tokenizer, arguments)


def _preference_prepared(
    spec: FineTuneJobSpec,
    train: Dataset,
    tokenizer: Any,
    *,
    plan: TrainingPlan,
    speed: SpeedSettings,
    scratch: str,
    data: PreparedData,
) -> Dataset:
    from kubetune.trainer.arguments import preference_arguments

    arguments = preference_arguments(
        spec, plan, speed, cuda=False, checkpoint_dir=scratch, has_eval=data.eval is not None
    )
    arguments.update(_LOOP_ONLY)
    return trl_preference_prepared(spec.method.type, train, tokenizer, arguments)


def _check_registry_push(spec: FineTuneJobSpec) -> None:
    """The output's registry takes this run's login for a push: a refused login or an
    unreachable registry fails here, not after the training it would have published."""
    from kubetune.api.uris import display_uri, oci_reference
    from kubetune.trainer.registry import RegistryError, auth_file, check_push_access

    registry = spec.output.registry
    try:
        check_push_access(
            oci_reference(spec.output.uri, "output"),
            plain_http=registry is not None and registry.plain_http,
            credentials=auth_file(),
        )
    except RegistryError as exc:
        raise InvalidConfig(
            f"output.uri: {display_uri(spec.output.uri)} can't be pushed to: {exc}"
        ) from None


def _plan_of(memory: MemoryPlan, plan: TrainingPlan) -> EstimatePlan:
    return EstimatePlan(
        micro_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        gradient_checkpointing=memory.describe_checkpointing(),
        optimizer=memory.optimizer,
    )


def _describe(estimate: Estimate, method: str = "sft") -> str:
    about = "about " if estimate.sampled else ""
    examples = "pairs" if method == "dpo" else "examples"
    parts = [
        f"{estimate.examples} {examples}, {about}{estimate.tokens} tokens an epoch in "
        f"{about}{estimate.sequences} {'pairs' if method == 'dpo' else 'sequences'}, "
        f"{estimate.steps} optimizer steps"
    ]
    if estimate.sampled:
        parts.append("counts extrapolated from a tokenized sample")
    if estimate.peak_gib is not None:
        parts.append(f"peak about {estimate.peak_gib} GiB on {estimate.gpu_kind}")
    if estimate.seconds is not None:
        parts.append(f"about {estimate.seconds:.0f} s of training")
    return "; ".join(parts)
