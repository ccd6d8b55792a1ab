"""``kubetune-trainer preflight``: check the data and estimate the run, before any GPU is asked for.

The Validating phase's CPU pod runs this with the training run's own config. It goes through the
same code the run goes through, up to where the run would load the weights: the tokenizer and
the model's config (:mod:`~kubetune.trainer.model.modeling`), the data read, checked and shaped
(:func:`~kubetune.trainer.dataset.formats.prepare`), the SFT arguments
(:func:`~kubetune.trainer.plan.arguments.sft_arguments`) and TRL's own dataset preparation
(tokenizing, truncating, packing: ``SFTTrainer._prepare_dataset``), and the memory plan
(:func:`~kubetune.trainer.plan.resolve.fit_to_card`) for ``validation.gpuKind``. Steps are
counted the way transformers' Trainer counts them from the prepared rows, and seconds come from the
measured speed table (:data:`~kubetune.trainer.plan.speed.GPU_KINDS`). A problem is the same
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
    MergeEstimate,
    TrainerResult,
    TrainingPlan,
)
from kubetune.api.uris import display_uri
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig
from kubetune.trainer.plan.arguments import RunArguments
from kubetune.trainer.plan.card import plan_settings
from kubetune.trainer.plan.memory import GIB
from kubetune.trainer.plan.shape import ModelShape
from kubetune.trainer.run.preference import extra_forward_passes, work_per_token

if TYPE_CHECKING:
    from datasets import Dataset

    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.dataset.formats import PreparedData
    from kubetune.trainer.plan.resolve import RunPlan

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
    from kubetune.trainer.dataset.formats import prepare
    from kubetune.trainer.model import fp8_base, varlen_attention
    from kubetune.trainer.model.modeling import load_tokenizer, locate_model, model_shape
    from kubetune.trainer.plan.resolve import fit_to_card, node_speed, training_plan
    from kubetune.trainer.plan.speed import GPU_KINDS, gpu_free_bytes
    from kubetune.trainer.run.assembly import starting_adapter

    spec = config.spec
    plan = training_plan(spec)
    kind = spec.validation.gpu_kind
    # The run's node: a GPU when the spec asks for one (the speed settings it will resolve).
    cuda = spec.resources.gpus > 0
    # The GPU kinds kubetune plans for all run FlashAttention-2 (compute capability >= 8.0);
    # FP8 matmuls where the kind is Hopper (an unnamed kind: the node decides at start).
    fp8_kind = kind is None or (kind in GPU_KINDS and GPU_KINDS[kind].fp8)
    speed = node_speed(
        spec,
        cuda,
        varlen_runs=cuda and varlen_attention.available(),
        fp8_runs=cuda and fp8_kind and fp8_base.available(),
    )

    located = locate_model(spec.model)
    source, is_hub = located
    tokenizer = load_tokenizer(source, spec.model, is_hub, read_token, spec.dataset.chat_template)
    shape = model_shape(source, spec.model, is_hub, read_token)
    if spec.output.is_oci:
        _check_registry_push(spec)
    if spec.model.adapter is not None:
        # A starting adapter that doesn't fit fails here, before a GPU is asked for.
        starting_adapter(spec, located, read_token)
    free = gpu_free_bytes(kind) if cuda and kind is not None else None
    # Without a card to plan for, the plan a node with unknown free memory makes (this pod has
    # no CUDA to ask).
    fitted = fit_to_card(spec, plan, speed, shape, cuda=cuda and free is not None, free_bytes=free)

    data = prepare(
        spec.dataset,
        chat_template=tokenizer.chat_template,
        seed=spec.training.seed,
        token=read_token,
        method=spec.method.type,
    )
    counts = _epoch_counts(spec, data, tokenizer, fitted)
    estimate = _estimate(spec, counts, fitted, shape, kind if cuda else None)
    message = _describe(estimate, spec.method.type)
    log.info("preflight: %s", message)
    return TrainerResult(
        outcome="Succeeded",
        reason=Reason.VALIDATED,
        message=message,
        base_model=BaseModelRef(uri=display_uri(spec.model.uri), revision=spec.model.revision),
        dataset_fingerprint=data.fingerprint,
        estimate=estimate,
    )


def _epoch_counts(
    spec: FineTuneJobSpec, data: PreparedData, tokenizer: Any, fitted: RunPlan
) -> Counts:
    """One epoch of the training data as the run's trainer prepares it, counted (from a sample
    of ``validation.maxSampleRecords`` examples, extrapolated, when there are more)."""
    from kubetune.trainer.dataset.formats import no_examples_left

    preference = spec.method.preference
    examples = len(data.train)
    limit = spec.validation.max_sample_records
    train = data.train
    if examples > limit:
        log.info("tokenizing a sample of %d of the %d examples", limit, examples)
        train = train.shuffle(seed=spec.training.seed).select(range(limit))
    prepared = _prepared_as_trl_does(spec, train, tokenizer, fitted, data)
    if len(prepared) == 0:
        raise DatasetUnusable(no_examples_left(spec.training.max_length))
    if preference:
        counts = count_preference(prepared, len(train), spec.training.max_length)
    else:
        counts = count(prepared, len(train))
    if len(train) < examples:
        counts = extrapolate(counts, examples)
    return counts


def _estimate(
    spec: FineTuneJobSpec,
    counts: Counts,
    fitted: RunPlan,
    shape: ModelShape | None,
    kind: str | None,
) -> Estimate:
    """The estimate of the run: steps, peak memory, and (``kind`` a measured GPU kind, the
    model's shape known) seconds of training."""
    from kubetune.trainer.plan.speed import estimated_seconds

    ranks = spec.resources.world_size
    memory = fitted.memory
    steps, per_epoch = optimizer_steps(counts.sequences, fitted.plan, ranks)
    trained_tokens = round(counts.tokens * steps / per_epoch)
    seconds = None
    if kind is not None and shape is not None:
        # The reference pass (and KTO's KL passes) cost forward FLOPs on top of the trained ones.
        passes = extra_forward_passes(spec.method)
        tokens_of_work = round(trained_tokens * work_per_token(shape, spec.lora.r, passes))
        seconds = estimated_seconds(
            kind, shape, lora_rank=spec.lora.r, plan=memory, tokens=tokens_of_work, ranks=ranks
        )
    peak = memory.estimated_peak_bytes
    return Estimate(
        examples=counts.examples,
        tokens=counts.tokens,
        sequences=counts.sequences,
        steps=steps,
        plan=plan_settings(memory, fitted.plan),
        gpu_kind=kind,
        peakGiB=round(peak / GIB, 1) if peak is not None else None,
        seconds=round(seconds) if seconds is not None else None,
        sampled=counts.sampled,
        merge=_merge_estimate(spec, shape),
    )


def _merge_estimate(spec: FineTuneJobSpec, shape: ModelShape | None) -> MergeEstimate | None:
    if not spec.output.merge or shape is None:
        return None
    from kubetune.trainer.plan.merge_cost import merge_cost

    cost = merge_cost(shape, spec.output.merge_base, spec.quantization.compute_dtype)
    return MergeEstimate(
        diskGiB=round(cost.disk_gib, 2),
        hostGiB=round(cost.host_gib, 2),
        gpuGiB=round(cost.gpu_gib, 2) if cost.gpu_gib is not None else None,
        seconds=round(cost.seconds, 1),
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


def _prepared_as_trl_does(
    spec: FineTuneJobSpec, train: Dataset, tokenizer: Any, fitted: RunPlan, data: PreparedData
) -> Dataset:
    """``train`` as the run's TRL trainer prepares it, with the run's own arguments."""
    from kubetune.trainer.run.assembly import trainer_arguments

    with tempfile.TemporaryDirectory(prefix="kubetune-preflight-") as scratch:
        # cuda: this pod's device; what prepares the data doesn't depend on it.
        run = RunArguments(cuda=False, checkpoint_dir=scratch)
        arguments = trainer_arguments(spec, fitted.plan, fitted.speed, data, run)
        arguments.update(_LOOP_ONLY)
        if spec.method.preference:
            return trl_preference_prepared(spec.method.type, train, tokenizer, arguments)
        return trl_prepared(train, tokenizer, arguments)


def _check_registry_push(spec: FineTuneJobSpec) -> None:
    """The output's registry takes this run's login for a push: a refused login or an
    unreachable registry fails here, not after the training it would have published."""
    from kubetune.api.uris import display_uri, oci_reference
    from kubetune.trainer.publish.registry import check_push_access
    from kubetune.trainer.publish.registry_client import RegistryError, auth_file

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
    if estimate.merge is not None:
        parts.append(
            f"the merge writes {estimate.merge.disk_gib} GiB with about "
            f"{estimate.merge.host_gib} GiB of host memory"
        )
    return "; ".join(parts)
