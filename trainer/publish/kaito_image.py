"""An adapter as the image KAITO pulls (``output.registry.layout: kaito``).

KAITO's ``Workspace`` takes an adapter from ``inference.adapters[].source.image``: an init
container copies the image with skopeo into a ``dir:`` layout (layers decompressed), unpacks
every layer into one root and moves that root's ``data/`` folder to ``/mnt/adapter/<name>``,
where vLLM loads it (KAITO's ``pkg/utils/image/puller.sh``; its own tuning jobs push adapters
the same way, ``pusher.sh``). So the image here is a plain OCI image manifest whose config is an
OCI image config naming one layer's diff id, and whose one layer is a gzip tar of ``data/`` with
the adapter's files. The tar is reproducible (fixed times, owners and modes), so the same
adapter gives the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from kubetune.api.timestamps import rfc3339
from kubetune.api.uris import OciReference
from kubetune.trainer.publish.registry import (
    Layer,
    Pushed,
    adapter_annotations,
    push_image,
    sha256_digest,
)
from kubetune.trainer.publish.registry_client import MANIFEST_MEDIA_TYPE

IMAGE_CONFIG_MEDIA_TYPE: Final = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
#: The folder KAITO's puller moves to the adapter's mount.
DATA_DIR: Final = "data"


def data_layer_tar(files: Iterable[Path]) -> bytes:
    """An uncompressed tar of ``data/`` holding ``files`` by name, reproducible."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(DATA_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for path in sorted(files, key=lambda item: item.name):
            entry = tarfile.TarInfo(f"{DATA_DIR}/{path.name}")
            entry.size, entry.mode = path.stat().st_size, 0o644
            with path.open("rb") as handle:
                tar.addfile(entry, handle)
    return buffer.getvalue()


def image_config(diff_id: str) -> bytes:
    document = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    return json.dumps(document, sort_keys=True).encode()


def image_manifest(config: bytes, layer: Layer, annotations: dict[str, str]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": IMAGE_CONFIG_MEDIA_TYPE,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
        "annotations": annotations,
    }
    return json.dumps(document, indent=2).encode()


def push_kaito_image(
    reference: OciReference,
    files: Iterable[Path],
    *,
    name: str,
    base_model: str,
    plain_http: bool,
    credentials: Path | None = None,
) -> Pushed:
    """Push ``files`` as KAITO's adapter image tagged ``reference.tag``; its manifest digest."""
    tar = data_layer_tar(files)
    with tempfile.TemporaryDirectory(prefix="kubetune-kaito-") as scratch:
        compressed = Path(scratch) / "layer.tar.gz"
        compressed.write_bytes(gzip.compress(tar, compresslevel=6, mtime=0))
        layer = Layer(
            compressed, LAYER_MEDIA_TYPE, sha256_digest(compressed), compressed.stat().st_size
        )
        config = image_config("sha256:" + hashlib.sha256(tar).hexdigest())
        description = f"LoRA adapter for {base_model}, trained by kubetune (KAITO adapter image)"
        manifest_annotations = adapter_annotations(name, description, base_model, rfc3339())
        body = image_manifest(config, layer, manifest_annotations)
        return push_image(
            reference, [layer], config, body, plain_http=plain_http, credentials=credentials
        )
