"""Training data, read: the files or hub splits a dataset URI names, checked record by record
(a broken line is reported by number), and a fingerprint of their source and content."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.datasets import MAX_JSON_DEPTH, too_deep
from kubetune.api.models import DatasetSpec
from kubetune.api.uris import DATASET_SCHEMES, display_uri
from kubetune.trainer import locations
from kubetune.trainer.dataset import downloads
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig, first_line
from kubetune.trainer.publish.digests import sha256_files

if TYPE_CHECKING:
    from datasets import Dataset

#: File suffix → the datasets builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class FileRecords:
    """One data file of a split: how many records it holds and, for JSON lines, the blank lines
    between them (so a record's index gives back its line number)."""

    path: str
    records: int | None
    blank_lines: tuple[int, ...] | None = None

    def where(self, index: int) -> str:
        """The record at ``index`` (0-based, within this file) as a person finds it."""
        if self.blank_lines is None:
            return f"{self.path} record {index + 1}"
        line = index + 1
        for blank in self.blank_lines:
            if blank <= line:
                line += 1
            else:
                break
        return f"{self.path} line {line}"


@dataclass(frozen=True)
class RecordOrigins:
    """Where the records of one split came from, in the order they were loaded."""

    split: str
    files: tuple[FileRecords, ...] = ()

    def where(self, index: int) -> str:
        """``dataset FILE line N`` for the record at ``index`` of the split (0-based)."""
        offset = 0
        for file in self.files:
            if file.records is None:
                break
            if index < offset + file.records:
                return "dataset " + file.where(index - offset)
            offset += file.records
        if len(self.files) == 1:
            return "dataset " + self.files[0].where(index)
        return f"dataset split {self.split!r} record {index + 1}"


@dataclass(frozen=True)
class RawSplits:
    """The dataset as read: its splits, where each record came from, and its fingerprint."""

    splits: dict[str, Dataset]
    origins: dict[str, RecordOrigins]
    fingerprint: str


def _validate_jsonl(path: Path) -> FileRecords:
    """Parse each line, so a broken one is reported by number rather than by an arrow trace."""
    records = 0
    blanks: list[int] = []
    try:
        with path.open("r", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    blanks.append(number)
                    continue
                value = _parse_line(path, number, line)
                if not isinstance(value, dict):
                    raise DatasetUnusable(
                        f"dataset {path}: line {number} is a JSON {_json_type(value)}, "
                        "not an object with one field per column"
                    )
                records += 1
    except UnicodeDecodeError as exc:
        raise DatasetUnusable(f"dataset {path} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise DatasetUnusable(f"cannot read dataset {path}: {exc.strerror}") from None
    return FileRecords(str(path), records, tuple(blanks))


def _parse_line(path: Path, number: int, line: str) -> Any:
    if too_deep(line):
        raise DatasetUnusable(
            f"dataset {path}: line {number} nests arrays and objects more than "
            f"{MAX_JSON_DEPTH} deep"
        )
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetUnusable(
            f"dataset {path}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError):
        # An integer of over 4,300 digits (Python's limit), or nesting past the recursion limit.
        raise DatasetUnusable(
            f"dataset {path}: line {number} is JSON that can't be read (too deep or too long)"
        ) from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


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


def _load_files(
    files: dict[str, list[str]], cache_dir: Path
) -> tuple[dict[str, Dataset], dict[str, RecordOrigins]]:
    from datasets import load_dataset

    suffixes = {Path(f).suffix for fs in files.values() for f in fs}
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        raise DatasetUnusable(
            f"dataset mixes file types ({', '.join(sorted(suffixes))}); use one type"
        )
    origins: dict[str, RecordOrigins] = {}
    for split, names in files.items():
        described = []
        for path in map(Path, names):
            described.append(_describe_file(path))
            if described[-1].records == 0 or path.stat().st_size == 0:
                raise DatasetUnusable(f"dataset {path} is empty: no records to train on")
        origins[split] = RecordOrigins(split, tuple(described))
    builder = builders.pop()
    try:
        loaded = load_dataset(builder, data_files=files, cache_dir=str(cache_dir))
    except DatasetUnusable:
        raise
    except Exception as exc:  # datasets raises many types; all of them mean "can't read it"
        # Its words quote the data (a header, a line): the log gets them, the status doesn't.
        raise DatasetUnusable(
            f"cannot read dataset {_names(files)}: not valid {builder} data "
            f"({type(exc).__name__}; the trainer's log says why)",
            detail=first_line(exc),
        ) from None
    return dict(loaded), origins


def _describe_file(path: Path) -> FileRecords:
    if path.suffix == ".jsonl" or (path.suffix == ".json" and _looks_like_json_lines(path)):
        return _validate_jsonl(path)
    return FileRecords(str(path), None)


def _looks_like_json_lines(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(1).strip()
    except OSError:
        return False
    return head == b"{"


def _names(files: dict[str, list[str]]) -> str:
    return ", ".join(f for fs in files.values() for f in fs)


def _load_hub(
    spec: DatasetSpec, repo_id: str, token: str | None, cache_dir: Path, eval_split: str | None
) -> dict[str, Dataset]:
    from datasets import load_dataset

    splits = [spec.split] + ([eval_split] if eval_split else [])
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
                f"cannot load hub dataset {repo_id} split {split!r}: {first_line(exc)}"
            ) from None
    return loaded


def read_splits(
    spec: DatasetSpec, token: str | None = None, *, field: str = "dataset.uri"
) -> RawSplits:
    """The raw splits of the dataset, where their records came from, and a fingerprint of its
    resolved source (credentials and query string left out) and content. ``field`` names the
    spec's URI to read (``dataset.evalUri`` reads the evaluation data, all of it one split)."""
    uri = spec.eval_uri if field == "dataset.evalUri" and spec.eval_uri else spec.uri
    try:
        where = locations.resolve(uri, DATASET_SCHEMES, field)
    except ValueError as exc:
        raise InvalidConfig(f"{field}: {exc}") from None
    cache_dir = locations.cache_root() / "datasets"
    shown = display_uri(uri)
    eval_split = spec.eval_split if field == "dataset.uri" else None
    if where.kind == "hub":
        assert where.remote is not None
        splits = _load_hub(spec, where.remote, token, cache_dir, eval_split)
        content = "|".join(d._fingerprint for d in splits.values())
        source = f"hub:{where.remote}@{spec.revision or 'main'}"
        origins = {name: RecordOrigins(name) for name in splits}
        return RawSplits(splits, origins, _fingerprint(source, content))
    if where.kind == "local":
        assert where.path is not None
        root = where.path
        if not root.exists():
            raise DatasetUnusable(f"dataset not found: {root} ({field} {shown})")
    else:
        root = _download(uri, where.kind)
    files = _data_files(root, spec.split, eval_split)
    if where.confined_to is not None:
        _refuse_escapes(files, where.confined_to, field)
    splits, origins = _load_files(files, cache_dir)
    content = sha256_files(f for fs in files.values() for f in fs)
    return RawSplits(splits, origins, _fingerprint(shown, content))


def _download(uri: str, kind: str) -> Path:
    shown = display_uri(uri)
    try:
        if kind == "http":
            return downloads.fetch_http(uri, "datasets-src")
        return locations.fetch_object_store(uri, "datasets-src")
    except downloads.DownloadFailed as exc:
        raise DatasetUnusable(f"cannot download dataset {shown}: {exc}") from None
    except ImportError as exc:
        raise DatasetUnusable(
            f"cannot read {shown}: {exc.name} is not installed (s3fs for s3://, gcsfs for gs://)"
        ) from None
    except InvalidConfig:
        raise
    except Exception as exc:
        raise DatasetUnusable(f"cannot download dataset {shown}: {first_line(exc)}") from None


def _refuse_escapes(files: dict[str, list[str]], mount: Path, field: str) -> None:
    """A file of a claim's dataset folder may be a symlink, but not to outside the claim."""
    for name in (f for fs in files.values() for f in fs):
        target = Path(name).resolve()
        if not target.is_relative_to(mount):
            raise InvalidConfig(f"{field}: {name} leads out of its claim (to {target})")


def _fingerprint(source: str, content: str) -> str:
    return "sha256:" + hashlib.sha256(f"{source}\n{content}".encode()).hexdigest()
