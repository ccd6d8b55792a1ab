"""The images a real node imports into its containerd: the image store that ``make images``
fills, looked up by reference.

The store holds each image's OCI index, manifest and config (``hack/images/build.sh`` puts
kubetune's images there)::

    <store>/<reference, URL-escaped>/oci/      the OCI layout (index.json, blobs/)

A real node reaches no registry: ``RealNode.import_images`` pushes a stored image from buildah's
storage into the node's containerd, labelled with the stored manifest's digest.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

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
class Image:
    reference: str
    digest: str  # the manifest's, as a container status' imageID


class ImageStore:
    """The images ``make images`` stored, looked up by reference."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, reference: str) -> Image | None:
        layout = self.root / urllib.parse.quote(normalized(reference), safe="") / "oci"
        if not (layout / "index.json").is_file():
            return None
        index = json.loads((layout / "index.json").read_text())
        return Image(reference=normalized(reference), digest=str(index["manifests"][0]["digest"]))
