"""Training data: detect its format and shape it the way TRL's SFTTrainer wants.

TRL trains on three shapes: language modeling (``text``), prompt-completion (``prompt`` and
``completion``, loss on the completion only) and conversational (``messages``). Every format the
spec accepts is mapped onto one of them here, so the training code has a single path. Every
problem a person can fix in their data is a :class:`DatasetUnusable` naming the file, the line or
the column.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.models import DatasetSpec
from kubetune.trainer.data_sources import read_splits
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

#: The columns each format needs, under their canonical names.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
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
                f"dataset has no column {column!r} ({alias}); its columns are: "
                + ", ".join(dataset.column_names)
            )
    clashes = [c for c in mapping.values() if c in dataset.column_names and c not in mapping]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(mapping) if mapping else dataset


def detect_format(columns: list[str]) -> str:
    """The format a set of (canonical) columns implies, most specific first."""
    for fmt in ("messages", "prompt-completion", "alpaca", "text"):
        if all(c in columns for c in FORMAT_COLUMNS[fmt]):
            return fmt
    raise DatasetUnusable(
        "cannot detect the dataset format from its columns ("
        + ", ".join(columns)
        + "): expected messages, prompt+completion, instruction+output, or text; set "
        "dataset.format and dataset.columns"
    )


def _require_columns(dataset: Dataset, fmt: str) -> None:
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in dataset.column_names]
    if missing:
        raise DatasetUnusable(
            f"dataset format {fmt} needs column(s) {', '.join(missing)}, but the dataset has: "
            + ", ".join(dataset.column_names)
            + " (map yours with dataset.columns)"
        )


def _require_strings(dataset: Dataset, columns: Iterable[str], fmt: str) -> None:
    for column in columns:
        feature = dataset.features[column]
        dtype = getattr(feature, "dtype", None)
        if dtype not in ("string", "large_string"):
            raise DatasetUnusable(
                f"dataset column {column!r} must hold text for format {fmt}, not {feature}"
            )


def _split_last_assistant_turn(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def shape_for_trl(
    dataset: Dataset, fmt: str, spec: DatasetSpec, chat_template: str | None
) -> tuple[Dataset, bool, bool]:
    """(dataset, assistant_only_loss, completion_only_loss) for a dataset in canonical columns."""
    _require_columns(dataset, fmt)
    if fmt == "text":
        _require_strings(dataset, ["text"], fmt)
        return dataset.select_columns(["text"]), False, False
    if fmt == "prompt-completion":
        _require_strings(dataset, ["prompt", "completion"], fmt)
        shaped = dataset.select_columns(["prompt", "completion"])
        return shaped, False, spec.completion_only_loss
    if fmt == "alpaca":
        has_input = "input" in dataset.column_names
        _require_strings(dataset, ["instruction", "output"] + (["input"] if has_input else []), fmt)

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
    _check_messages(dataset)
    messages = dataset.select_columns(["messages"])
    if not spec.completion_only_loss:
        return messages, False, False
    if has_generation_markers(chat_template):
        return messages, True, False
    # Without generation markers TRL can't find the assistant turns in the template's output, so
    # the final assistant turn becomes the completion and everything before it the prompt.
    shaped = messages.map(_split_last_assistant_turn, remove_columns=["messages"])
    return shaped, False, True


def _check_messages(dataset: Dataset) -> None:
    for index, row in enumerate(dataset.select(range(min(len(dataset), 1000)))):
        messages = row["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        )
        if not ok:
            raise DatasetUnusable(
                f"dataset record {index + 1}: messages must be a non-empty list of "
                "{role, content} objects"
            )
        if messages[-1]["role"] != "assistant":
            raise DatasetUnusable(
                f"dataset record {index + 1}: the last message must be the assistant's "
                f"(it is {messages[-1]['role']!r}), or there is nothing to learn"
            )


def prepare(
    spec: DatasetSpec, chat_template: str | None, seed: int, token: str | None = None
) -> PreparedData:
    """Read, check, shape and split the data the spec names."""
    splits, fingerprint = read_splits(spec, token)
    if spec.split not in splits:
        raise DatasetUnusable(
            f"dataset has no split {spec.split!r} (dataset.split); it has: "
            + ", ".join(sorted(splits))
        )
    train = splits[spec.split]
    if len(train) == 0:
        raise DatasetUnusable(f"dataset {spec.uri} is empty: no records to train on")
    train = apply_column_mapping(train, spec)
    fmt = detect_format(train.column_names) if spec.format == "auto" else spec.format
    train, assistant_only, completion_only = shape_for_trl(train, fmt, spec, chat_template)

    evaluation: Dataset | None = None
    if spec.eval_split:
        if spec.eval_split not in splits:
            raise DatasetUnusable(
                f"dataset has no split {spec.eval_split!r} (dataset.evalSplit); it has: "
                + ", ".join(sorted(splits))
            )
        raw_eval = apply_column_mapping(splits[spec.eval_split], spec)
        evaluation, _, _ = shape_for_trl(raw_eval, fmt, spec, chat_template)
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
    )
