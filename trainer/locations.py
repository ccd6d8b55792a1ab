"""Where things live: model, dataset and output URIs resolved to local paths, or to remotes.

A URI is taken apart by :func:`kubetune.api.uris.parse_uri` (the one parser, shared with the API
models and the operator); this module says where each kind lives on this node:
``pvc://claim/path`` is the claim mounted at ``$KUBETUNE_PVC_ROOT/claim`` (the operator mounts each
claim there) and may not lead out of it, not even through a symlink; ``file://`` and plain paths
are local; ``s3://`` and ``gs://`` go through fsspec (install s3fs or gcsfs for them); a bare
``org/name`` or ``hf://org/name`` is a hub id; ``http(s)://`` datasets are
:mod:`~kubetune.trainer.dataset.downloads`'.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetune.api.contract import DEFAULT_PVC_ROOT, PVC_ROOT_ENV
from kubetune.api.uris import ParsedUri, display_uri, parse_uri

CACHE_ENV = "KUBETUNE_CACHE_DIR"
Kind = Literal["local", "hub", "object-store", "http"]

#: A name ending like ``.jsonl`` or ``.csv`` is a file, even where no such file exists yet: hub
#: ids have dots too (``Llama-3.1-8B``), but not a purely alphabetic suffix.
_FILE_SUFFIX = re.compile(r"\.[A-Za-z]{1,8}$")


@dataclass(frozen=True)
class Location:
    """A resolved URI: ``path`` for local files, ``remote`` for everything fetched."""

    uri: str
    kind: Kind
    path: Path | None = None
    remote: str | None = None
    #: For a claim: its mount, resolved; nothing read through this location may lead out of it.
    confined_to: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "kubetune"))


def resolve(uri: str, allowed: Iterable[str], what: str) -> Location:
    """Where the ``what`` URI (model, dataset, output) lives, given the schemes it may use; a
    hub id is possible where ``hf`` is among them. ValueError says what is wrong."""
    allowed = tuple(allowed)
    parsed = parse_uri(uri, allowed, what)
    if parsed.kind == "hub-or-path":
        return _hub_or_path(parsed, hub_allowed="hf" in allowed)
    if parsed.kind == "file":
        return Location(uri, "local", path=Path(parsed.path))
    if parsed.kind == "pvc":
        assert parsed.claim is not None
        mount = (pvc_root() / parsed.claim).resolve()
        return Location(uri, "local", path=_inside(mount, parsed, what), confined_to=mount)
    if parsed.kind == "hub":
        return Location(uri, "hub", remote=parsed.path)
    if parsed.kind == "object-store":
        return Location(uri, "object-store", remote=uri)
    if parsed.kind == "registry":
        raise ValueError(f"{what} URI {display_uri(uri)} names a registry, not a place for files")
    return Location(uri, "http", remote=uri)


def _hub_or_path(parsed: ParsedUri, hub_allowed: bool) -> Location:
    path = Path(parsed.uri).expanduser()
    looks_like_hub_id = (
        hub_allowed
        and parsed.could_be_hub_id
        and not _FILE_SUFFIX.search(parsed.uri)
        and not path.exists()
    )
    if looks_like_hub_id:
        return Location(parsed.uri, "hub", remote=parsed.uri)
    return Location(parsed.uri, "local", path=path.resolve())


def _inside(mount: Path, parsed: ParsedUri, what: str) -> Path:
    """The path under the claim's mount, symlinks followed; refused if it leads out of it."""
    resolved = (mount / parsed.path).resolve()
    if not resolved.is_relative_to(mount):
        raise ValueError(
            f"{what} URI {display_uri(parsed.uri)} leads out of its claim {parsed.claim!r} "
            f"(it resolves to {resolved}, outside {mount})"
        )
    return resolved


def refuse_escapes(folder: Path, mount: Path) -> None:
    """Every entry of ``folder`` (a model folder on a claim), followed through its symlinks, is
    a file or folder inside ``mount``: ValueError names the first that isn't.

    Libraries read whatever a model folder holds (a ``chat_template.jinja``, a tokenizer file)
    and copy some of it into the adapter they save and publish; one linked to
    ``/proc/self/environ`` or another claim would carry the pod's tokens or another tenant's
    files out with it.
    """
    seen: set[Path] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(current.iterdir())
        except OSError as exc:
            raise ValueError(f"cannot list {current}: {exc.strerror}") from None
        for entry in entries:
            target = entry.resolve()
            if not target.is_relative_to(mount):
                raise ValueError(f"{entry} leads out of its claim (to {target})")
            if target.is_dir():
                if target not in seen:
                    seen.add(target)
                    pending.append(entry)
            elif not target.is_file():
                raise ValueError(f"{entry} is not a regular file")


def cache_dir_for(uri: str, what: str) -> Path:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / what / digest


def fetch_object_store(uri: str, what: str) -> Path:
    """Copy an ``s3://``/``gs://`` file or prefix into the local cache; returns the local copy."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    target = cache_dir_for(uri, what)
    if fs.isdir(root):
        target.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(target), recursive=True)
        return target
    target.mkdir(parents=True, exist_ok=True)
    local = target / Path(root).name
    fs.get(root, str(local))
    return local


def upload_directory(local: Path, uri: str) -> None:
    """Copy a local directory's contents to an object-store prefix."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    fs.put(str(local).rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
