"""Training data: find it, read it, detect its format, and shape it the way TRL's SFTTrainer wants.

TRL trains on three shapes: language modeling (``text``), prompt-completion (``prompt`` and
``completion``, loss on the completion only) and conversational (``messages``). Every format the
spec accepts is mapped onto one of them here, so the training code has a single path. Every
problem a person can fix in their data is a :class:`DatasetUnusable` naming the file, the line or
the column.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.models import DatasetSpec
from kubetune.trainer import locations
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

#: File suffix → the datasets builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

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


# --- reading ---------------------------------------------------------------------------------


def _validate_jsonl(path: Path) -> int:
    """Parse each line, so a broken one is reported by number rather than by an arrow trace."""
    records = 0
    try:
        with path.open("r", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetUnusable(
                        f"dataset {path}: line {number} is not valid JSON ({exc.msg}, "
                        f"column {exc.colno})"
                    ) from None
                if not isinstance(value, dict):
                    raise DatasetUnusable(
                        f"dataset {path}: line {number} is a JSON {type(value).__name__}, "
                        "not an object with one field per column"
                    )
                records += 1
    except UnicodeDecodeError as exc:
        raise DatasetUnusable(f"dataset {path} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise DatasetUnusable(f"cannot read dataset {path}: {exc.strerror}") from None
    return records


def _data_files(root: Path, split: str, eval_split: str | None) -> dict[str, list[str]]:
    """Files of each split: a file is its split; a directory's files are split by name."""
    if root.is_file():
        if root.suffix not in BUILDERS:
            raise DatasetUnusable(
                f"dataset {root}: unsupported file type {root.suffix or '(none)'}; "
                "use .jsonl, .json, .csv or .parquet"
            )
        return {split: [str(root)]}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    if not files:
        raise DatasetUnusable(
            f"dataset directory {root} holds no .jsonl, .json, .csv or .parquet files"
        )
    by_split: dict[str, list[str]] = {}
    for file in files:
        named = file.stem.split("-")[0].split(".")[0]
        key = named if named in {split, eval_split} else split
        by_split.setdefault(key, []).append(str(file))
    return by_split


def _load_files(files: dict[str, list[str]], cache_dir: Path) -> dict[str, Dataset]:
    from datasets import load_dataset

    suffixes = {Path(f).suffix for fs in files.values() for f in fs}
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        raise DatasetUnusable(
            f"dataset mixes file types ({', '.join(sorted(suffixes))}); use one type"
        )
    for path in (Path(f) for fs in files.values() for f in fs):
        records: int | None = None
        if path.suffix == ".jsonl" or (path.suffix == ".json" and _looks_like_json_lines(path)):
            records = _validate_jsonl(path)
        if records == 0 or path.stat().st_size == 0:
            raise DatasetUnusable(f"dataset {path} is empty: no records to train on")
    try:
        loaded = load_dataset(builders.pop(), data_files=files, cache_dir=str(cache_dir))
    except DatasetUnusable:
        raise
    except Exception as exc:  # datasets raises many types; all of them mean "can't read it"
        raise DatasetUnusable(f"cannot read dataset {_names(files)}: {_short(exc)}") from None
    return dict(loaded)


def _looks_like_json_lines(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(1).strip()
    except OSError:
        return False
    return head == b"{"


def _names(files: dict[str, list[str]]) -> str:
    return ", ".join(f for fs in files.values() for f in fs)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def _load_hub(
    spec: DatasetSpec, repo_id: str, token: str | None, cache_dir: Path
) -> dict[str, Dataset]:
    from datasets import load_dataset

    splits = [spec.split] + ([spec.eval_split] if spec.eval_split else [])
    loaded: dict[str, Dataset] = {}
    for split in splits:
        try:
            loaded[split] = load_dataset(
                repo_id,
                split=split,
                revision=spec.revision,
                token=token,
                cache_dir=str(cache_dir),
            )
        except Exception as exc:
            raise DatasetUnusable(
                f"cannot load hub dataset {repo_id} split {split!r}: {_short(exc)}"
            ) from None
    return loaded


def _file_digest(paths: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(paths):
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_splits(spec: DatasetSpec, token: str | None = None) -> tuple[dict[str, Dataset], str]:
    """The raw splits of the dataset, and a fingerprint of its resolved source and content."""
    try:
        where = locations.resolve(spec.uri)
    except ValueError as exc:
        raise InvalidConfig(f"dataset.uri: {exc}") from None
    cache_dir = locations.cache_root() / "datasets"
    if where.kind == "hub":
        assert where.remote is not None
        splits = _load_hub(spec, where.remote, token, cache_dir)
        content = "|".join(d._fingerprint for d in splits.values())
        source = f"hub:{where.remote}@{spec.revision or 'main'}"
        return splits, _fingerprint(source, content)
    if where.kind == "local":
        assert where.path is not None
        root = where.path
        if not root.exists():
            raise DatasetUnusable(f"dataset not found: {root} (dataset.uri {spec.uri})")
    else:
        try:
            root = (
                locations.fetch_http(spec.uri, "datasets-src")
                if where.kind == "http"
                else locations.fetch_object_store(spec.uri, "datasets-src")
            )
        except ImportError as exc:
            raise DatasetUnusable(
                f"cannot read {spec.uri}: {exc.name} is not installed (s3fs for s3://, gcsfs "
                "for gs://)"
            ) from None
        except Exception as exc:
            raise DatasetUnusable(f"cannot download dataset {spec.uri}: {_short(exc)}") from None
    files = _data_files(root, spec.split, spec.eval_split)
    splits = _load_files(files, cache_dir)
    content = _file_digest(f for fs in files.values() for f in fs)
    return splits, _fingerprint(spec.uri, content)


def _fingerprint(source: str, content: str) -> str:
    return "sha256:" + hashlib.sha256(f"{source}\n{content}".encode()).hexdigest()


# --- shaping ---------------------------------------------------------------------------------


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
