"""The shapes the operator's modules pass around: a namespaced object's key, a Kubernetes object
as read (from the API or the watch caches), and a manifest: a plain dict the operator builds, or
the API client returns, and may change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: (namespace, name).
Key = tuple[str, str]
#: A Kubernetes object, only read: what a function takes when it changes nothing.
Obj = Mapping[str, Any]
#: A FineTuneJob as the caches (or the API) hold it.
Ftj = Mapping[str, Any]
#: A plain JSON-shaped dict the operator owns: one it renders or slims, or the API's answer.
Manifest = dict[str, Any]
