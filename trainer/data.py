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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.models import DatasetSpec
from kubetune.api.uris import display_uri
from kubetune.trainer.data_sources import RecordOrigins, read_splits
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
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired-preference": ("prompt", "completion", "label"),
}
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
                f"dataset has no column {column!r} ({alias}); {_COLUMNS_IN_LOG}",
                detail=_columns_of(dataset.column_names),
            )
    clashes = [c for c in mapping.values() if c in dataset.column_names and c not in mapping]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(mapping) if mapping else dataset


#: Column names are the data's words (a CSV's header line is its first line): they go to the
#: trainer's log, never to the termination message the job's status shows.
_COLUMNS_IN_LOG = "the trainer's log lists the dataset's columns"


def _columns_of(columns: Iterable[str]) -> str:
    return "the dataset's columns: " + ", ".join(repr(c) for c in columns)


def detect_format(columns: list[str], method: str = "sft") -> str:
    """The format a set of (canonical) columns implies for ``method``, most specific first."""
    for fmt in DETECTED_FORMATS[method]:
        if all(c in columns for c in FORMAT_COLUMNS[fmt]):
            return fmt
    raise DatasetUnusable(
        "cannot detect the dataset format from its columns: expected "
        f"{_EXPECTED_COLUMNS[method]} for method.type {method}; set dataset.format and "
        f"dataset.columns ({_COLUMNS_IN_LOG})",
        detail=_columns_of(columns),
    )


def _require_columns(dataset: Dataset, fmt: str) -> None:
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in dataset.column_names]
    if missing:
        raise DatasetUnusable(
            f"dataset format {fmt} needs column(s) {', '.join(missing)}; map yours with "
            f"dataset.columns ({_COLUMNS_IN_LOG})",
            detail=_columns_of(dataset.column_names),
        )


def _check_text(
    dataset: Dataset,
    columns: Iterable[str],
    fmt: str,
    spec: DatasetSpec,
    origins: RecordOrigins,
    *,
    optional: Iterable[str] = (),
) -> None:
    """Every value of ``columns`` is text (and of ``optional`` ones, text or null); the first
    that isn't is named by file and line."""
    nullable = set(optional)
    for column in [*columns, *nullable]:
        if _all_text(dataset, column, allow_null=column in nullable):
            continue
        for index, value in enumerate(_values(dataset, column)):
            if not isinstance(value, str) and not (value is None and column in nullable):
                raise DatasetUnusable(
                    f"{origins.where(index)}: {_column_name(column, spec)} is "
                    f"{_describe(value)}; format {fmt} needs text there"
                )


def _all_text(dataset: Dataset, column: str, allow_null: bool) -> bool:
    """The cheap answer from arrow: a string column with no null (or nulls allowed)."""
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return False
    return allow_null or dataset.data.column(column).null_count == 0


def _values(dataset: Dataset, column: str, batch_size: int = 1000) -> Iterator[Any]:
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        yield from batch[column]


def _column_name(column: str, spec: DatasetSpec) -> str:
    mapped = getattr(spec.columns, column, None)
    return f"{mapped!r} (dataset.columns.{column})" if mapped else repr(column)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


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
    _require_columns(dataset, fmt)
    if fmt in ("preference", "unpaired-preference"):
        conversational = _check_preference(dataset, fmt, spec, origins)
        if conversational and not chat_template:
            raise InvalidConfig(
                f"dataset format {fmt} with chat messages needs a chat template: the tokenizer "
                "has none; set dataset.chatTemplate"
            )
        return dataset.select_columns(list(FORMAT_COLUMNS[fmt])), False, False
    if fmt == "text":
        _check_text(dataset, ["text"], fmt, spec, origins)
        return dataset.select_columns(["text"]), False, False
    if fmt == "prompt-completion":
        _check_text(dataset, ["prompt", "completion"], fmt, spec, origins)
        shaped = dataset.select_columns(["prompt", "completion"])
        return shaped, False, spec.completion_only_loss
    if fmt == "alpaca":
        has_input = "input" in dataset.column_names
        optional = ["input"] if has_input else []
        _check_text(dataset, ["instruction", "output"], fmt, spec, origins, optional=optional)

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
    _check_messages(dataset, spec, origins)
    messages = dataset.select_columns(["messages"])
    if not spec.completion_only_loss:
        return messages, False, False
    if has_generation_markers(chat_template):
        return messages, True, False
    # Without generation markers TRL can't find the assistant turns in the template's output, so
    # the final assistant turn becomes the completion and everything before it the prompt.
    shaped = messages.map(_split_last_assistant_turn, remove_columns=["messages"])
    return shaped, False, True


def _check_messages(dataset: Dataset, spec: DatasetSpec, origins: RecordOrigins) -> None:
    """Every record: a non-empty list of {role, content} with text in both, the assistant's
    last. The first record that breaks this is named by file and line."""
    column = _column_name("messages", spec)
    for index, messages in enumerate(_values(dataset, "messages")):
        where = origins.where(index)
        if not isinstance(messages, list) or not messages:
            raise DatasetUnusable(
                f"{where}: {column} is {_describe(messages)}; it must be a non-empty list of "
                "{role, content} objects"
            )
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DatasetUnusable(
                    f"{where}: message {number} of {column} is not a {{role, content}} object"
                )
            for key in ("role", "content"):
                if not isinstance(message[key], str):
                    raise DatasetUnusable(
                        f"{where}: the {key} of message {number} of {column} is "
                        f"{_describe(message[key])}; it must be text"
                    )
        if messages[-1]["role"] != "assistant":
            raise DatasetUnusable(
                f"{where}: the last message must be the assistant's, or there is nothing to learn",
                detail=f"its role is {messages[-1]['role']!r}",
            )


def _kind(value: Any) -> str | None:
    """``text`` or ``messages`` for a value a preference record may hold there, else None."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value:
        for message in value:
            if not isinstance(message, dict) or not all(
                isinstance(message.get(key), str) for key in ("role", "content")
            ):
                return None
        return "messages"
    return None


def _check_preference(
    dataset: Dataset, fmt: str, spec: DatasetSpec, origins: RecordOrigins
) -> bool:
    """Every record of a preference format: its prompt and answers all text, or all non-empty
    lists of {role, content} with text in both (the answers ending with the assistant's), the
    same in every record; for unpaired-preference a true or false label. The first record that
    breaks this is named by file and line. Whether the records are chat messages."""
    answers = [c for c in FORMAT_COLUMNS[fmt] if c not in ("prompt", "label")]
    texts = ["prompt", *answers]
    first: str | None = None
    columns = [*texts, *(["label"] if fmt == "unpaired-preference" else [])]
    rows = dataset.select_columns(columns).iter(batch_size=1000)
    index = 0
    for batch in rows:
        for offset in range(len(batch["prompt"])):
            where = origins.where(index + offset)
            for column in texts:
                value = batch[column][offset]
                kind = _kind(value)
                if kind is None:
                    raise DatasetUnusable(
                        f"{where}: {_column_name(column, spec)} is {_describe(value)}; format "
                        f"{fmt} needs text or a non-empty list of {{role, content}} objects "
                        "with text in both there"
                    )
                if first is None:
                    first = kind
                elif kind != first:
                    raise DatasetUnusable(
                        f"{where}: {_column_name(column, spec)} is {_kind_name(kind)} where "
                        f"the first record has {_kind_name(first)}; a dataset of format {fmt} "
                        "is all text or all chat messages"
                    )
                if kind == "messages" and column != "prompt" and value[-1]["role"] != "assistant":
                    raise DatasetUnusable(
                        f"{where}: the last message of {_column_name(column, spec)} must be the "
                        "assistant's"
                    )
            if fmt == "unpaired-preference":
                label = batch["label"][offset]
                if not isinstance(label, bool):
                    raise DatasetUnusable(
                        f"{where}: {_column_name('label', spec)} is {_describe(label)}; format "
                        f"{fmt} needs true (desirable) or false (undesirable) there"
                    )
        index += len(batch["prompt"])
    return first == "messages"


def _kind_name(kind: str) -> str:
    return "text" if kind == "text" else "chat messages"


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
