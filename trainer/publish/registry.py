"""An adapter in an OCI registry: pushed as one artifact (``output.uri: oci://...``), pulled back
by tag or digest (``model.adapter``).

The artifact follows the CNCF ModelPack specification (github.com/modelpack/model-spec,
``specs-go/v1``): an OCI image manifest whose ``artifactType`` is the model manifest type, a
model config blob, and one layer a file. Layers are the *raw* (unarchived, uncompressed) media
types, so that each layer's digest is the sha256 of the file itself (the weights layer's digest
is ``status.result.sha256``), any OCI client pulls the files back byte for byte (``oras pull``
names each by its ``org.opencontainers.image.title``), and nothing is compressed that doesn't
compress (safetensors).

The registry is spoken to through :mod:`~kubetune.trainer.publish.registry_client` (the distribution
API, the logins).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune.api.timestamps import rfc3339
from kubetune.api.uris import OciReference
from kubetune.trainer.publish.digests import sha256_file
from kubetune.trainer.publish.registry_client import (
    MANIFEST_MEDIA_TYPE,
    RegistryClient,
    RegistryError,
    auth_file,
    login_for,
)

log = logging.getLogger(__name__)

#: ModelPack v1 (specs-go/v1/mediatype.go).
ARTIFACT_TYPE: Final = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE: Final = "application/vnd.cncf.model.config.v1+json"
WEIGHT_MEDIA_TYPE: Final = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_MEDIA_TYPE: Final = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_MEDIA_TYPE: Final = "application/vnd.cncf.model.doc.v1.raw"
#: ModelPack's layer annotation (specs-go/v1/annotations.go) and OCI's file name annotation.
FILEPATH_ANNOTATION: Final = "org.cncf.model.filepath"
TITLE_ANNOTATION: Final = "org.opencontainers.image.title"
CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
DESCRIPTION_ANNOTATION: Final = "org.opencontainers.image.description"
BASE_MODEL_ANNOTATION: Final = "io.kubetune.base-model"


@dataclass(frozen=True)
class Layer:
    path: Path
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Pushed:
    digest: str
    layers: tuple[Layer, ...]


# --- the artifact ------------------------------------------------------------------------------


def sha256_digest(path: Path) -> str:
    return f"sha256:{sha256_file(path)}"


def media_type_for(name: str, weights: str) -> str:
    """The ModelPack layer type of one of the adapter's files."""
    if name == weights:
        return WEIGHT_MEDIA_TYPE
    if name.endswith((".md", ".png")) or name == "result.json":
        return DOC_MEDIA_TYPE
    return WEIGHT_CONFIG_MEDIA_TYPE


def layers_of(files: Sequence[Path], weights: str) -> tuple[Layer, ...]:
    return tuple(
        Layer(path, media_type_for(path.name, weights), sha256_digest(path), path.stat().st_size)
        for path in files
    )


def model_config(
    layers: Sequence[Layer], *, name: str, description: str, precision: str, created: str
) -> bytes:
    """The ModelPack model config (``specs-go/v1/config.go``'s ``Model``): raw layers' diff ids
    are their digests."""
    document = {
        "descriptor": {"name": name, "createdAt": created, "description": description},
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
        "config": {"format": "safetensors", "precision": precision},
    }
    return json.dumps(document, indent=2, sort_keys=True).encode()


def manifest(config: bytes, layers: Sequence[Layer], annotations: Mapping[str, str]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {
                    TITLE_ANNOTATION: layer.path.name,
                    FILEPATH_ANNOTATION: layer.path.name,
                },
            }
            for layer in layers
        ],
        "annotations": dict(annotations),
    }
    return json.dumps(document, indent=2).encode()


def push_adapter(
    reference: OciReference,
    files: Iterable[Path],
    *,
    weights: str,
    name: str,
    base_model: str,
    precision: str,
    plain_http: bool,
    credentials: Path | None = None,
) -> Pushed:
    """Push ``files`` as one ModelPack artifact tagged ``reference.tag``; its manifest digest."""
    created = rfc3339()
    layers = layers_of(list(files), weights)
    description = f"LoRA adapter for {base_model}, trained by kubetune"
    config = model_config(
        layers, name=name, description=description, precision=precision, created=created
    )
    body = manifest(config, layers, adapter_annotations(name, description, base_model, created))
    return push_image(
        reference, layers, config, body, plain_http=plain_http, credentials=credentials
    )


def adapter_annotations(
    name: str, description: str, base_model: str, created: str
) -> dict[str, str]:
    """The manifest annotations of an adapter kubetune pushes."""
    return {
        CREATED_ANNOTATION: created,
        TITLE_ANNOTATION: name,
        DESCRIPTION_ANNOTATION: description,
        BASE_MODEL_ANNOTATION: base_model,
    }


def push_image(
    reference: OciReference,
    layers: Sequence[Layer],
    config: bytes,
    body: bytes,
    *,
    plain_http: bool,
    credentials: Path | None = None,
) -> Pushed:
    """Upload ``layers`` and ``config``, then put the manifest ``body`` that names them under
    ``reference.tag`` (the login from ``credentials``, else :func:`auth_file`'s)."""
    client = RegistryClient(
        reference,
        plain_http=plain_http,
        login=login_for(reference.host, credentials or auth_file()),
    )
    for layer in layers:
        client.push_blob(layer.digest, layer.size, layer.path)
    client.push_blob("sha256:" + hashlib.sha256(config).hexdigest(), len(config), config)
    return Pushed(client.put_manifest(body), tuple(layers))


def check_push_access(
    reference: OciReference, *, plain_http: bool, credentials: Path | None = None
) -> None:
    """The registry lets this login push to the repository: an upload is started, then
    cancelled (nothing is written). RegistryError says what it answered."""
    client = RegistryClient(
        reference, plain_http=plain_http, login=login_for(reference.host, credentials)
    )
    client.start_and_cancel_upload()


def pull_artifact(
    reference: OciReference, target: Path, *, plain_http: bool, credentials: Path | None = None
) -> str:
    """Pull an artifact's layers into ``target``, each as the file its title names (digests and
    sizes checked); the manifest's digest."""
    client = RegistryClient(
        reference, plain_http=plain_http, login=login_for(reference.host, credentials)
    )
    body = client.get_manifest()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if reference.digest is not None and digest != reference.digest:
        raise RegistryError(f"{client.shown}: the registry sent a manifest of another digest")
    try:
        document = json.loads(body)
        layers = list(document["layers"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"{client.shown}: the manifest is not an OCI image manifest") from None
    target.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        title = (layer.get("annotations") or {}).get(TITLE_ANNOTATION, "")
        if not isinstance(title, str) or not _SAFE_NAME.match(title):
            raise RegistryError(f"{client.shown}: a layer names no plain file name ({title!r})")
        client.get_blob(str(layer["digest"]), int(layer["size"]), target / title)
    return digest


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
