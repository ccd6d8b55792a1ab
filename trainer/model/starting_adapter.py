"""``spec.model.adapter``: a LoRA adapter to continue training from, fetched from wherever it is
(an OCI registry by tag or digest, a hub, an object store, a claim, a local path) and checked
against the spec and the base model before any weight is loaded: the preflight (the Validating
phase) and the trainer run the same checks.

The checks: the folder holds a LoRA adapter (``adapter_config.json`` with ``peft_type: LORA``
and ``adapter_model.safetensors``); its rank and alpha are ``lora.r`` and ``lora.alpha`` (a
different shape would be a different run: say so, naming the fields); every module it adapts
exists in the base model with the adapter's input and output sizes (read from the safetensors
header against the base model built on the meta device: no weights are read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.contract import ADAPTER_REGISTRY_AUTH_ENV
from kubetune.api.models import FineTuneJobSpec, StartingAdapterSpec
from kubetune.api.uris import ADAPTER_SCHEMES, display_uri, oci_reference
from kubetune.trainer import locations
from kubetune.trainer.errors import InvalidConfig, ModelUnusable, first_line

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_FILE_SCHEMES = tuple(s for s in ADAPTER_SCHEMES if s != "oci")


@dataclass(frozen=True)
class StartingAdapter:
    path: Path
    #: Where it came from, as the result and the model card show it (oci://: by digest).
    shown: str


def locate_adapter(adapter: StartingAdapterSpec, token: str | None) -> StartingAdapter:
    """The adapter as a local folder (pulled or downloaded into the cache where it isn't one)."""
    if adapter.uri.startswith("oci://"):
        return _pull(adapter)
    try:
        where = locations.resolve(adapter.uri, _FILE_SCHEMES, "model.adapter")
    except ValueError as exc:
        raise InvalidConfig(f"model.adapter.uri: {exc}") from None
    shown = display_uri(adapter.uri)
    try:
        if where.kind == "hub":
            from huggingface_hub import snapshot_download

            assert where.remote is not None
            path = Path(
                snapshot_download(
                    where.remote,
                    revision=adapter.revision,
                    token=token,
                    allow_patterns=["*.json", "*.safetensors"],
                )
            )
            return StartingAdapter(path, shown)
        if where.kind == "object-store":
            return StartingAdapter(locations.fetch_object_store(adapter.uri, "adapters"), shown)
    except Exception as exc:
        raise ModelUnusable(f"model.adapter: cannot fetch {shown}: {first_line(exc)}") from None
    assert where.path is not None
    if where.confined_to is not None and where.path.is_dir():
        try:
            locations.refuse_escapes(where.path, where.confined_to)
        except ValueError as exc:
            raise InvalidConfig(f"model.adapter.uri: {exc}") from None
    return StartingAdapter(where.path, shown)


def adapter_auth_file() -> Path | None:
    """The docker config for the adapter's registry: the pod's mounted Secret
    (``$KUBETUNE_ADAPTER_REGISTRY_AUTH_FILE``), else where ``kubetune train`` looks."""
    from kubetune.trainer.publish.registry_client import auth_file

    named = os.environ.get(ADAPTER_REGISTRY_AUTH_ENV)
    return Path(named) if named else auth_file()


def _pull(adapter: StartingAdapterSpec) -> StartingAdapter:
    from kubetune.trainer.publish.registry import pull_artifact
    from kubetune.trainer.publish.registry_client import RegistryError

    reference = oci_reference(adapter.uri, "model.adapter", pull=True)
    key = hashlib.sha256(adapter.uri.encode()).hexdigest()[:16]
    target = locations.cache_root() / "adapters" / key
    plain_http = adapter.registry is not None and adapter.registry.plain_http
    try:
        digest = pull_artifact(
            reference, target, plain_http=plain_http, credentials=adapter_auth_file()
        )
    except RegistryError as exc:
        raise ModelUnusable(
            f"model.adapter: cannot pull {display_uri(adapter.uri)}: {exc}"
        ) from None
    log.info("pulled the starting adapter %s", reference.pinned(digest))
    return StartingAdapter(target, reference.pinned(digest))


def check_adapter(adapter: StartingAdapter, spec: FineTuneJobSpec, base_config: Any) -> None:
    """The adapter fits the spec's LoRA shape and the base model (``base_config``: its
    transformers config); InvalidConfig or ModelUnusable naming what doesn't."""
    config_path = adapter.path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelUnusable(
            f"model.adapter: {adapter.shown} holds no readable {ADAPTER_CONFIG}: not a PEFT adapter"
        ) from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ModelUnusable(
            f"model.adapter: {adapter.shown} is a {config.get('peft_type')!r} adapter, not LoRA"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if rank != spec.lora.r or alpha != spec.lora.alpha:
        r, a = _number(rank), _number(alpha)
        raise InvalidConfig(
            f"model.adapter: {adapter.shown} has r={r} and lora_alpha={a}; continuing it "
            f"needs lora.r: {r} and lora.alpha: {a} (the spec has {_number(spec.lora.r)} and "
            f"{_number(spec.lora.alpha)})"
        )
    shapes = _lora_shapes(adapter.path / ADAPTER_WEIGHTS, adapter.shown)
    modules = _meta_linear_shapes(base_config)
    for name, (in_features, out_features) in sorted(shapes.items()):
        if name not in modules:
            raise ModelUnusable(
                f"model.adapter: {adapter.shown} adapts {name}, which the base model "
                f"{display_uri(spec.model.uri)} doesn't have: it was trained on another model"
            )
        if modules[name] != (in_features, out_features):
            base_in, base_out = modules[name]
            raise ModelUnusable(
                f"model.adapter: {adapter.shown} doesn't fit the base model "
                f"{display_uri(spec.model.uri)}: {name} maps {in_features}→{out_features} in the "
                f"adapter, {base_in}→{base_out} in the base"
            )


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def _lora_shapes(weights: Path, shown: str) -> dict[str, tuple[int, int]]:
    """Module name → (in, out) of each adapted Linear, from the safetensors header."""
    try:
        with weights.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        raise ModelUnusable(f"model.adapter: {shown} holds no readable {ADAPTER_WEIGHTS}") from None
    found: dict[str, dict[str, list[int]]] = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or ".lora_" not in key:
            continue
        module, _, part = key.partition(".lora_")
        module = module.removeprefix("base_model.model.")
        found.setdefault(module, {})[part.split(".")[0]] = list(entry.get("shape", []))
    shapes = {}
    for module, parts in found.items():
        a, b = parts.get("A"), parts.get("B")
        if a and b and len(a) == 2 and len(b) == 2:
            shapes[module] = (a[1], b[0])
    if not shapes:
        raise ModelUnusable(f"model.adapter: {shown} holds no LoRA weights")
    return shapes


def _meta_linear_shapes(base_config: Any) -> dict[str, tuple[int, int]]:
    """Every Linear of the base model → (in, out), built on the meta device (no weights)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(base_config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
