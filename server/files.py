"""Uploaded files: one folder per namespace under the configured root (a claim's mount), each
file beside its metadata, and the signed, expiring URLs through which a trainer pod downloads
one (the trainer has no identity to show; the signature names the namespace and the file)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
#: Namespace names as Kubernetes spells them (a DNS label), so a path can't be made of one.
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class StoredFile:
    """A file's metadata, as OpenAI's File object has it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    format: str
    examples: int

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def clean_filename(name: str | None) -> str:
    """A display name: no path, no control or format characters, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c for c in base if unicodedata.category(c)[0] != "C")
    return kept.strip()[:255] or "upload.jsonl"


class FileStore:
    """Files by namespace: ``<root>/<namespace>/<id>.jsonl`` and ``<id>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, namespace: str) -> Path:
        if not NAMESPACE.match(namespace):
            raise ValueError(f"not a namespace name: {namespace!r}")
        return self.root / namespace

    def _paths(self, namespace: str, file_id: str) -> tuple[Path, Path] | None:
        if not FILE_ID.match(file_id):
            return None
        folder = self._folder(namespace)
        return folder / f"{file_id}.jsonl", folder / f"{file_id}.json"

    @staticmethod
    def new_id() -> str:
        return f"file-{secrets.token_hex(12)}"

    def temporary(self, namespace: str) -> Path:
        """A fresh path in the namespace's folder to stream an upload into."""
        folder = self._folder(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".upload-{secrets.token_hex(8)}"

    def keep(self, namespace: str, upload: Path, meta: StoredFile) -> None:
        """Make a checked upload durable: data first, then its metadata (which makes it seen)."""
        paths = self._paths(namespace, meta.id)
        assert paths is not None
        data, info = paths
        with upload.open("rb") as handle:
            os.fsync(handle.fileno())
        upload.replace(data)
        partial = info.with_suffix(".json.partial")
        partial.write_text(json.dumps(asdict(meta)))
        partial.replace(info)

    def get(self, namespace: str, file_id: str) -> StoredFile | None:
        paths = self._paths(namespace, file_id)
        if paths is None or not paths[1].is_file():
            return None
        return StoredFile(**json.loads(paths[1].read_text()))

    def content_path(self, namespace: str, file_id: str) -> Path | None:
        paths = self._paths(namespace, file_id)
        if paths is None or not paths[1].is_file() or not paths[0].is_file():
            return None
        return paths[0]

    def list(self, namespace: str) -> list[StoredFile]:
        folder = self._folder(namespace)
        if not folder.is_dir():
            return []
        found = []
        for info in folder.glob("file-*.json"):
            try:
                found.append(StoredFile(**json.loads(info.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, namespace: str, file_id: str) -> bool:
        paths = self._paths(namespace, file_id)
        if paths is None or not paths[1].is_file():
            return False
        paths[1].unlink(missing_ok=True)
        paths[0].unlink(missing_ok=True)
        return True


class UrlSigner:
    """HMAC-SHA256 over namespace, file id and expiry."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def signature(self, namespace: str, file_id: str, expires: int) -> str:
        message = f"{namespace}/{file_id}/{expires}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def url(self, base: str, namespace: str, file_id: str, seconds: int) -> str:
        expires = int(time.time()) + seconds
        signature = self.signature(namespace, file_id, expires)
        return (
            f"{base.rstrip('/')}/datasets/{namespace}/{file_id}.jsonl"
            f"?expires={expires}&signature={signature}"
        )

    def valid(self, namespace: str, file_id: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self.signature(namespace, file_id, expires), signature)
