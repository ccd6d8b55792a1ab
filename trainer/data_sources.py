"""Training data, read: the files or hub splits a dataset URI names, checked record by record
(a broken line is reported by number), and a fingerprint of their source and content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.models import DatasetSpec
from kubetune.api.uris import DATASET_SCHEMES, display_uri
from kubetune.trainer import locations
from kubetune.trainer.digests import sha256_files
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig, first_line

if TYPE_CHECKING:
    from datasets import Dataset

#: File suffix → the datasets builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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
        raise DatasetUnusable(f"cannot read dataset {_names(files)}: {first_line(exc)}") from None
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
                f"cannot load hub dataset {repo_id} split {split!r}: {first_line(exc)}"
            ) from None
    return loaded


def read_splits(spec: DatasetSpec, token: str | None = None) -> tuple[dict[str, Dataset], str]:
    """The raw splits of the dataset, and a fingerprint of its resolved source and content."""
    try:
        where = locations.resolve(spec.uri, DATASET_SCHEMES, "dataset")
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
                f"cannot read {display_uri(spec.uri)}: {exc.name} is not installed (s3fs for "
                "s3://, gcsfs for gs://)"
            ) from None
        except Exception as exc:
            raise DatasetUnusable(
                f"cannot download dataset {display_uri(spec.uri)}: {first_line(exc)}"
            ) from None
    files = _data_files(root, spec.split, spec.eval_split)
    if where.confined_to is not None:
        _refuse_escapes(files, where.confined_to)
    splits = _load_files(files, cache_dir)
    content = sha256_files(f for fs in files.values() for f in fs)
    return splits, _fingerprint(spec.uri, content)


def _refuse_escapes(files: dict[str, list[str]], mount: Path) -> None:
    """A file of a claim's dataset folder may be a symlink, but not to outside the claim."""
    for name in (f for fs in files.values() for f in fs):
        target = Path(name).resolve()
        if not target.is_relative_to(mount):
            raise InvalidConfig(f"dataset.uri: {name} leads out of its claim (to {target})")


def _fingerprint(source: str, content: str) -> str:
    return "sha256:" + hashlib.sha256(f"{source}\n{content}".encode()).hexdigest()
