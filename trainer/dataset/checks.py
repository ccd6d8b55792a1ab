"""Training data, checked record by record: a problem names the file, the line and the column.

Every column a format needs, every value of the type it must hold, chat messages and preference
records in the shape TRL reads; a problem is a
:class:`~kubetune.trainer.errors.DatasetUnusable` (the ``dataset.columns`` mapping named).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kubetune.api.datasets import FORMAT_FIELDS
from kubetune.trainer.errors import DatasetUnusable

if TYPE_CHECKING:
    from datasets import Dataset

    from kubetune.api.models import DatasetSpec
    from kubetune.trainer.dataset.sources import RecordOrigins

#: The columns each format needs, under their canonical names: the record formats' fields as
#: the Validating phase and kubetune-server check them (OpenAI's preference pairs aside: the
#: server hands those on as the trainer's own), and KTO's unpaired preferences.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    **{fmt: fields for fmt, fields in FORMAT_FIELDS.items() if fmt != "openai-preference"},
    "unpaired-preference": ("prompt", "completion", "label"),
}

COLUMNS_IN_LOG = "the trainer's log lists the dataset's columns"


def columns_of(columns: Iterable[str]) -> str:
    return "the dataset's columns: " + ", ".join(repr(c) for c in columns)


def require_columns(dataset: Dataset, fmt: str) -> None:
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in dataset.column_names]
    if missing:
        raise DatasetUnusable(
            f"dataset format {fmt} needs column(s) {', '.join(missing)}; map yours with "
            f"dataset.columns ({COLUMNS_IN_LOG})",
            detail=columns_of(dataset.column_names),
        )


def check_text(
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


def check_messages(dataset: Dataset, spec: DatasetSpec, origins: RecordOrigins) -> None:
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


def check_preference(dataset: Dataset, fmt: str, spec: DatasetSpec, origins: RecordOrigins) -> bool:
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
