"""Reading YAML and JSON documents that someone else wrote, within limits.

A manifest or config is small: a few KiB, a few hundred values, a dozen levels deep. A hostile
one (a YAML alias bomb, a deeply nested document) is refused here with a clear message, before
any model or serializer walks it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import yaml

MAX_DOCUMENT_BYTES: Final = 1 << 20
MAX_VALUES: Final = 100_000
MAX_DEPTH: Final = 64


class DocumentTooLarge(ValueError):
    """A document over the size, value-count or depth limit."""


def check_limits(data: Any, what: str) -> None:
    """Walk ``data`` as a serializer would (shared references count each time they appear, so an
    alias bomb counts as big as it expands) and refuse it past the limits."""
    budget = MAX_VALUES
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise DocumentTooLarge(f"{what} has more than {MAX_VALUES} values (YAML aliases count)")
        if depth > MAX_DEPTH:
            raise DocumentTooLarge(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
            budget -= len(node)
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


def load_json_from_a_pod(text: str | bytes, what: str) -> Any:
    """JSON a pod wrote (its termination message, a progress report), within the limits and with
    every NaN and infinity left out: Python's json reads and writes them, the Kubernetes API
    refuses a body that holds one, so one would make the job's status unwritable. A key whose
    value is one is dropped; in a list the item becomes null. ValueError (DocumentTooLarge for
    the limits) for anything else: not JSON, nested past Python's recursion limit, an integer of
    over 4,300 digits."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise DocumentTooLarge(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    check_limits(data, what)
    return finite_only(data)


def finite_only(data: Any) -> Any:
    """``data`` (parsed JSON, within the limits) without NaN and infinities: dropped from objects,
    null in lists."""
    if isinstance(data, dict):
        return {key: finite_only(value) for key, value in data.items() if not _not_finite(value)}
    if isinstance(data, list):
        return [finite_only(value) for value in data]
    return None if _not_finite(data) else data


def _not_finite(value: Any) -> bool:
    """Whether ``value`` is a float JSON can't hold: NaN or an infinity."""
    return isinstance(value, float) and not math.isfinite(value)


def load_yaml_documents(text: str, what: str) -> list[Any]:
    """Every non-empty YAML document in ``text``, each within the limits."""
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    for document in documents:
        check_limits(document, what)
    return documents
