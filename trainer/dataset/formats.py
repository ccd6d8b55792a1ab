"""Training data: detect its format and shape it the way TRL's SFTTrainer, DPOTrainer or
KTOTrainer wants.

TRL's SFTTrainer trains on three shapes: language modeling (``text``), prompt-completion
(``prompt`` and ``completion``, loss on the completion only) and conversational (``messages``).
Every SFT format the spec accepts is mapped onto one of them here, so the training code has a
single path. Preference tuning reads pairs (``prompt``, ``chosen``, ``rejected``) or, for KTO,
unpaired answers (``prompt``, ``completion``, ``label``), each as text or as chat messages, as
TRL's DPOTrainer and KTOTrainer take them. Every problem a person can fix in their data is a
:class:`DatasetUnusable` naming the file, the line or the column.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.models import DatasetSpec
from kubetune.api.uris import display_uri
from kubetune.trainer.dataset.checks import (
    COLUMNS_IN_LOG,
    FORMAT_COLUMNS,
    check_messages,
    check_preference,
    check_text,
    columns_of,
    require_columns,
)
from kubetune.trainer.dataset.sources import RecordOrigins, read_splits
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

#: The formats ``auto`` tries for each method, most specific first.
DETECTED_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "prompt-completion", "alpaca", "text"),
    "dpo": ("preference",),
    "kto": ("preference", "unpaired-preference"),
}
_EXPECTED_COLUMNS = {
    "sft": "messages, prompt+completion, instruction+output, or text",
    "dpo": "prompt+chosen+rejected",
    "kto": "prompt+chosen+rejected or prompt+completion+label",
}

# The Stanford Alpaca prompt, so an alpaca dataset trains the way it was meant to be prompted.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class PreparedData:
    """Data ready for SFTTrainer, and what the result says about it."""

    train: Dataset
    eval: Dataset | None
    format: str
    fingerprint: str
    #: TRL's assistant-only loss (a chat template with generation markers masks the rest).
    assistant_only_loss: bool
    #: Prompt tokens are masked from the loss (prompt-completion shapes).
    completion_only_loss: bool
    #: spec.method.type: sft, dpo or kto.
    method: str = "sft"

    @property
    def prompt_format(self) -> str:
        """The SFT format whose prompts look like this data's (for the evaluation prompts)."""
        if self.format not in ("preference", "unpaired-preference"):
            return self.format
        return "messages" if isinstance(self.train[0]["prompt"], list) else "prompt-completion"


def no_examples_left(max_length: int) -> str:
    """Why a dataset whose every example TRL dropped can't be trained on."""
    # TRL drops examples whose completion was truncated away; none left is a data problem.
    return (
        f"no training example keeps a completion token within training.maxLength "
        f"({max_length}); raise it or shorten the prompts"
    )


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_WITHOUT_INPUT.format(instruction=instruction)


def has_generation_markers(chat_template: str | None) -> bool:
    return bool(chat_template) and "{% generation %}" in (chat_template or "").replace(
        "{%- generation %}", "{% generation %}"
    )


def apply_column_mapping(dataset: Dataset, spec: DatasetSpec) -> Dataset:
    """Rename mapped columns to their canonical names; an absent mapped column is an error."""
    mapping = {
        column: canonical
        for canonical, column in spec.columns.model_dump().items()
        if column is not None and column != canonical
    }
    for canonical, column in spec.columns.model_dump().items():
        if column is not None and column not in dataset.column_names:
            alias = "dataset.columns." + canonical
            raise DatasetUnusable(
                f"dataset has no column {column!r} ({alias}); {COLUMNS_IN_LOG}",
                detail=columns_of(dataset.column_names),
            )
    clashes = [c for c in mapping.values() if c in dataset.column_names and c not in mapping]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(mapping) if mapping else dataset


#: Column names are the data's words (a CSV's header line is its first line): they go to the
#: trainer's log, never to the termination message the job's status shows.
def detect_format(columns: list[str], method: str = "sft") -> str:
    """The format a set of (canonical) columns implies for ``method``, most specific first."""
    for fmt in DETECTED_FORMATS[method]:
        if all(c in columns for c in FORMAT_COLUMNS[fmt]):
            return fmt
    raise DatasetUnusable(
        "cannot detect the dataset format from its columns: expected "
        f"{_EXPECTED_COLUMNS[method]} for method.type {method}; set dataset.format and "
        f"dataset.columns ({COLUMNS_IN_LOG})",
        detail=columns_of(columns),
    )


def _split_last_assistant_turn(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def shape_for_trl(
    dataset: Dataset,
    fmt: str,
    spec: DatasetSpec,
    chat_template: str | None,
    origins: RecordOrigins | None = None,
) -> tuple[Dataset, bool, bool]:
    """(dataset, assistant_only_loss, completion_only_loss) for a dataset in canonical columns;
    a record that can't be trained on is a DatasetUnusable naming its file and line."""
    origins = origins or RecordOrigins(spec.split)
    require_columns(dataset, fmt)
    if fmt in ("preference", "unpaired-preference"):
        conversational = check_preference(dataset, fmt, spec, origins)
        if conversational and not chat_template:
            raise InvalidConfig(
                f"dataset format {fmt} with chat messages needs a chat template: the tokenizer "
                "has none; set dataset.chatTemplate"
            )
        return dataset.select_columns(list(FORMAT_COLUMNS[fmt])), False, False
    if fmt == "text":
        check_text(dataset, ["text"], fmt, spec, origins)
        return dataset.select_columns(["text"]), False, False
    if fmt == "prompt-completion":
        check_text(dataset, ["prompt", "completion"], fmt, spec, origins)
        shaped = dataset.select_columns(["prompt", "completion"])
        return shaped, False, spec.completion_only_loss
    if fmt == "alpaca":
        has_input = "input" in dataset.column_names
        optional = ["input"] if has_input else []
        check_text(dataset, ["instruction", "output"], fmt, spec, origins, optional=optional)

        def to_prompt_completion(row: dict[str, Any]) -> dict[str, str]:
            prompt = alpaca_prompt(row["instruction"], row.get("input") if has_input else None)
            return {"prompt": prompt, "completion": row["output"]}

        shaped = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
        return shaped, False, spec.completion_only_loss
    # messages
    if not chat_template:
        raise InvalidConfig(
            "dataset format messages needs a chat template: the tokenizer has none; set "
            "dataset.chatTemplate"
        )
    check_messages(dataset, spec, origins)
    messages = dataset.select_columns(["messages"])
    if not spec.completion_only_loss:
        return messages, False, False
    if has_generation_markers(chat_template):
        return messages, True, False
    # Without generation markers TRL can't find the assistant turns in the template's output, so
    # the final assistant turn becomes the completion and everything before it the prompt.
    shaped = messages.map(_split_last_assistant_turn, remove_columns=["messages"])
    return shaped, False, True


def _combined(*fingerprints: str) -> str:
    return "sha256:" + hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def prepare(
    spec: DatasetSpec,
    chat_template: str | None,
    seed: int,
    token: str | None = None,
    method: str = "sft",
) -> PreparedData:
    """Read, check, shape and split the data the spec names, for ``method`` (spec.method.type)."""
    raw = read_splits(spec, token)
    splits, fingerprint = raw.splits, raw.fingerprint
    if spec.split not in splits:
        raise DatasetUnusable(
            f"dataset has no split {spec.split!r} (dataset.split); the trainer's log lists "
            "the splits it has",
            detail="its splits: " + ", ".join(repr(s) for s in sorted(splits)),
        )
    train = splits[spec.split]
    if len(train) == 0:
        raise DatasetUnusable(f"dataset {display_uri(spec.uri)} is empty: no records to train on")
    train = apply_column_mapping(train, spec)
    fmt = detect_format(train.column_names, method) if spec.format == "auto" else spec.format
    train, assistant_only, completion_only = shape_for_trl(
        train, fmt, spec, chat_template, raw.origins.get(spec.split)
    )

    evaluation: Dataset | None = None
    if spec.eval_split:
        if spec.eval_split not in splits:
            raise DatasetUnusable(
                f"dataset has no split {spec.eval_split!r} (dataset.evalSplit); it has: "
                + ", ".join(sorted(splits))
            )
        raw_eval = apply_column_mapping(splits[spec.eval_split], spec)
        evaluation, _, _ = shape_for_trl(
            raw_eval, fmt, spec, chat_template, raw.origins.get(spec.eval_split)
        )
    elif spec.eval_uri:
        held = read_splits(spec, token, field="dataset.evalUri")
        if spec.split not in held.splits or len(held.splits[spec.split]) == 0:
            raise DatasetUnusable(
                f"dataset.evalUri {display_uri(spec.eval_uri)} holds no records to evaluate on"
            )
        raw_eval = apply_column_mapping(held.splits[spec.split], spec)
        evaluation, _, _ = shape_for_trl(
            raw_eval, fmt, spec, chat_template, held.origins.get(spec.split)
        )
        fingerprint = _combined(fingerprint, held.fingerprint)
    elif spec.eval_fraction:
        if len(train) < 2:
            raise DatasetUnusable("dataset is too small to hold out dataset.evalFraction of it")
        parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    log.info(
        "dataset: %d training records%s, format %s, fingerprint %s",
        len(train),
        f", {len(evaluation)} eval" if evaluation is not None else "",
        fmt,
        fingerprint,
    )
    return PreparedData(
        train=train,
        eval=evaluation,
        format=fmt,
        fingerprint=fingerprint,
        assistant_only_loss=assistant_only,
        completion_only_loss=completion_only,
        method=method,
    )
