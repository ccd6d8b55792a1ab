"""What one node agent declares: the Node's name, capacity, labels and taints, and the host
environment its pods inherit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.local.rest import JSON


@dataclass
class NodeConfig:
    name: str
    gpus: int = 1
    cpu: str = ""  # empty: the host's cores
    memory: str = ""  # empty: the host's memory
    max_pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JSON] = field(default_factory=list)
    pass_env: Sequence[str] = ()
    # Images run on the host's Python and PATH instead of from the image store (fast mode).
    host_images: Sequence[str] = ()
    image_store: Path | None = None  # None: images.default_store()


def parse_taint(text: str) -> JSON:
    """``key[=value]:Effect`` as in ``kubectl taint``."""
    key_value, _, effect = text.rpartition(":")
    if not key_value or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(
            f"taint {text!r}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
        )
    key, _, value = key_value.partition("=")
    taint: JSON = {"key": key, "effect": effect}
    if value:
        taint["value"] = value
    return taint
