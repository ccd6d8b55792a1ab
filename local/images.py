"""The images a local node runs, and which images it runs on the host instead.

The store holds each image's OCI index, manifest and config beside its root filesystem
(``hack/images/build.sh`` puts kubetune's two images there, the root filesystem as hard links to
buildah's layers)::

    <store>/<reference, URL-escaped>/oci/      the OCI layout (index.json, blobs/)
    <store>/<reference, URL-escaped>/bundle/rootfs/

A container whose image is in the store runs in that root filesystem with the image's
ENTRYPOINT, CMD, ENV, WORKDIR and USER, under the pod's overrides (see ``image_process``). An
image that isn't there can't be pulled (a local node reaches no registry): the container waits
with ``ErrImageNeverPull`` or ``ImagePullBackOff``, as on a real node. Only images matching the
node's host-image patterns (``--host-image``, the explicit fast mode) run on the host's Python
and PATH, with the host's root, ignoring the image.
"""

from __future__ import annotations

import fnmatch
import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.local.rest import JSON

STORE_ENV = "KUBETUNE_IMAGE_STORE"


def default_store() -> Path:
    """Where ``make images`` puts the images: under kubetune's cache (or $KUBETUNE_IMAGE_STORE)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    cache = os.environ.get("KUBETUNE_CACHE_DIR") or str(Path.home() / ".cache" / "kubetune")
    return Path(cache) / "images" / "store"


def normalized(reference: str) -> str:
    """``reference`` with the implicit ``:latest`` tag made explicit."""
    name = reference.rsplit("/", 1)[-1]
    if "@" in reference or ":" in name:
        return reference
    return f"{reference}:latest"


@dataclass(frozen=True)
class ImageConfig:
    """What of an OCI image's config a container runtime applies."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_oci(cls, config: Mapping[str, Any]) -> ImageConfig:
        env = []
        for entry in config.get("Env") or []:
            name, _, value = str(entry).partition("=")
            env.append((name, value))
        return cls(
            entrypoint=tuple(config.get("Entrypoint") or ()),
            cmd=tuple(config.get("Cmd") or ()),
            env=tuple(env),
            working_dir=str(config.get("WorkingDir") or ""),
            user=str(config.get("User") or ""),
        )


@dataclass(frozen=True)
class Image:
    reference: str
    digest: str  # the manifest's, as a container status' imageID
    rootfs: Path
    config: ImageConfig

    @property
    def image_id(self) -> str:
        return f"{self.reference.split(':')[0]}@{self.digest}"


class ImageNotPresent(Exception):
    """The image is neither in the store nor run on the host."""


class ImageStore:
    """The images one node has, looked up by reference."""

    def __init__(self, root: Path, host_patterns: Sequence[str] = ()) -> None:
        self.root = root
        self.host_patterns = tuple(host_patterns)

    def runs_on_host(self, reference: str) -> bool:
        """Whether ``reference`` is one of the node's host images (the explicit fast mode)."""
        return any(
            fnmatch.fnmatchcase(name, pattern)
            for pattern in self.host_patterns
            for name in (reference, normalized(reference))
        )

    def find(self, reference: str) -> Image | None:
        entry = self.root / urllib.parse.quote(normalized(reference), safe="")
        rootfs = entry / "bundle" / "rootfs"
        layout = entry / "oci"
        if not rootfs.is_dir() or not (layout / "index.json").is_file():
            return None
        index = json.loads((layout / "index.json").read_text())
        digest = str(index["manifests"][0]["digest"])
        manifest = json.loads(_blob(layout, digest).read_text())
        config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
        return Image(
            reference=normalized(reference),
            digest=digest,
            rootfs=rootfs,
            config=ImageConfig.from_oci(config.get("config") or {}),
        )


def _blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


@dataclass(frozen=True)
class Process:
    """What a container runs, once image and pod are combined."""

    argv: list[str]
    env: dict[str, str]
    working_dir: str
    uid: int
    gid: int


def image_argv(container: JSON, config: ImageConfig) -> list[str]:
    """The kubelet's rule: ``command`` replaces ENTRYPOINT (dropping CMD), ``args`` CMD."""
    command = container.get("command")
    args = container.get("args")
    if command:
        return [*command, *(args or [])]
    return [*config.entrypoint, *(args if args else config.cmd)]


def image_user(container: JSON, pod_security: JSON, image: Image) -> tuple[int, int]:
    """(uid, gid): ``runAsUser``/``runAsGroup`` (container, then pod) over the image's USER."""
    own = container.get("securityContext") or {}
    user, _, group = image.config.user.partition(":")
    uid = _id(user or "0", image.rootfs / "etc" / "passwd")
    gid_default = _primary_gid(uid, image.rootfs / "etc" / "passwd")
    gid = _id(group, image.rootfs / "etc" / "group") if group else gid_default
    run_as_user = own.get("runAsUser", pod_security.get("runAsUser"))
    run_as_group = own.get("runAsGroup", pod_security.get("runAsGroup"))
    if run_as_user is not None:
        uid = int(run_as_user)
        if not group:
            gid = _primary_gid(uid, image.rootfs / "etc" / "passwd")
    if run_as_group is not None:
        gid = int(run_as_group)
    return uid, gid


def home_of(uid: int, rootfs: Path) -> str:
    for fields in _entries(rootfs / "etc" / "passwd"):
        if len(fields) > 5 and fields[2] == str(uid):
            return fields[5]
    return "/"


def _entries(path: Path) -> list[list[str]]:
    try:
        return [line.split(":") for line in path.read_text().splitlines() if line]
    except OSError:
        return []


def _id(name: str, database: Path) -> int:
    if name.isdigit():
        return int(name)
    for fields in _entries(database):
        if fields[0] == name and len(fields) > 2:
            return int(fields[2])
    raise ValueError(f"unable to find user or group {name!r} in the image's {database.name}")


def _primary_gid(uid: int, passwd: Path) -> int:
    for fields in _entries(passwd):
        if len(fields) > 3 and fields[2] == str(uid):
            return int(fields[3])
    return uid if uid == 0 else 0
