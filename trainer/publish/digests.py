"""sha256 of files, streamed: the adapter's digest and the dataset's fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 20


def sha256_files(paths: Iterable[str | Path]) -> str:
    """One digest over the bytes of every file, in sorted path order."""
    digest = hashlib.sha256()
    for name in sorted(str(p) for p in paths):
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return sha256_files([path])
