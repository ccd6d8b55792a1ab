"""Where things live: model, dataset and output URIs resolved to local paths, or to object stores.

``pvc://claim/path`` is the claim mounted at ``$KUBETUNE_PVC_ROOT/claim`` (the operator mounts each
claim there), ``file://`` and plain paths are local, ``s3://`` and ``gs://`` go through fsspec
(install s3fs or gcsfs for them), and a bare ``org/name`` or ``hf://org/name`` is a hub id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
CACHE_ENV = "KUBETUNE_CACHE_DIR"
OBJECT_STORE_SCHEMES = ("s3", "gs")

Kind = Literal["local", "hub", "object-store", "http"]


@dataclass(frozen=True)
class Location:
    """A resolved URI: ``path`` for local files, ``remote`` for everything fetched."""

    uri: str
    kind: Kind
    path: Path | None = None
    remote: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "kubetune"))


def resolve(uri: str, *, hub_allowed: bool = True) -> Location:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        path = Path(uri).expanduser()
        looks_like_hub_id = (
            hub_allowed
            and not path.exists()
            and not uri.startswith((".", "/", "~"))
            and uri.count("/") <= 1
            and not path.suffix
        )
        if looks_like_hub_id:
            return Location(uri, "hub", remote=uri)
        return Location(uri, "local", path=path.resolve())
    if scheme == "file":
        return Location(uri, "local", path=Path(rest))
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        return Location(uri, "local", path=pvc_root() / claim / sub)
    if scheme == "hf" and hub_allowed:
        return Location(uri, "hub", remote=rest)
    if scheme in OBJECT_STORE_SCHEMES:
        return Location(uri, "object-store", remote=uri)
    if scheme in ("http", "https"):
        return Location(uri, "http", remote=uri)
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri}")


def _cache_dir_for(uri: str, what: str) -> Path:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / what / digest


def fetch_object_store(uri: str, what: str) -> Path:
    """Copy an ``s3://``/``gs://`` file or prefix into the local cache; returns the local copy."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    target = _cache_dir_for(uri, what)
    if fs.isdir(root):
        target.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(target), recursive=True)
        return target
    target.mkdir(parents=True, exist_ok=True)
    local = target / Path(root).name
    fs.get(root, str(local))
    return local


def fetch_http(uri: str, what: str) -> Path:
    """Download an https file into the local cache, keeping its name (its suffix says its type)."""
    name = Path(urllib.parse.urlparse(uri).path).name or "data"
    target = _cache_dir_for(uri, what) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    # resolve() sent only http(s) URIs here, so no file:// or custom scheme reaches urlopen.
    response = urllib.request.urlopen(uri, timeout=60)  # noqa: S310
    with response, partial.open("wb") as out:
        shutil.copyfileobj(response, out)
    partial.replace(target)
    return target


def upload_directory(local: Path, uri: str) -> None:
    """Copy a local directory's contents to an object-store prefix."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    fs.put(str(local).rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
