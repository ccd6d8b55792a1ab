"""URIs of models, datasets and outputs: parsed once, here, into a typed result.

The API models validate with :func:`parse_uri`, the operator reads the claims to mount from it,
and the trainer resolves it to a path or a remote. A URI is a scheme (``hf``, ``s3``, ``gs``,
``pvc``, ``https``, ``http``, ``file``) or, with no scheme, a hub id or a local path.

Paths are refused when they could leave where they point: ``..`` segments, empty segments and
NUL or other control characters, in every URI.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

Scheme = Literal["", "hf", "s3", "gs", "pvc", "https", "http", "file"]
Kind = Literal["hub-or-path", "hub", "object-store", "pvc", "http", "file"]

MODEL_SCHEMES: Final[tuple[Scheme, ...]] = ("hf", "s3", "gs", "pvc", "file")
DATASET_SCHEMES: Final[tuple[Scheme, ...]] = (*MODEL_SCHEMES, "https", "http")
OUTPUT_SCHEMES: Final[tuple[Scheme, ...]] = ("s3", "gs", "pvc", "file")
#: The schemes a pod in a cluster may use; file:// and plain paths are for `kubetune train`.
CLUSTER_SCHEMES: Final[frozenset[str]] = frozenset({"hf", "s3", "gs", "pvc", "https", "http"})

_KINDS: Final[dict[str, Kind]] = {
    "": "hub-or-path",
    "hf": "hub",
    "s3": "object-store",
    "gs": "object-store",
    "pvc": "pvc",
    "https": "http",
    "http": "http",
    "file": "file",
}
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A plain hub id: ``name`` or ``org/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?$")


@dataclass(frozen=True)
class ParsedUri:
    """A URI taken apart. ``path`` is what follows ``scheme://`` (for ``pvc``, what follows the
    claim); for a URI without a scheme it is the URI itself."""

    uri: str
    scheme: Scheme
    path: str
    claim: str | None = None

    @property
    def kind(self) -> Kind:
        return _KINDS[self.scheme]

    @property
    def could_be_hub_id(self) -> bool:
        """A scheme-less ``org/name`` that names a hub repository unless such a path exists."""
        return self.scheme == "" and bool(_HUB_ID.match(self.uri)) and "." not in self.uri[:1]


def parse_uri(value: str, allowed: Iterable[str], what: str) -> ParsedUri:
    """Parse ``value`` as a ``what`` URI (model, dataset, output) with one of ``allowed``
    schemes or none; ValueError with a message that names the rule it breaks."""
    allowed = tuple(allowed)
    if _CONTROL.search(value):
        raise ValueError(f"{what} URI must not contain control characters or NUL bytes")
    scheme, sep, rest = value.partition("://")
    if not sep:
        _check_segments(value, what, value)
        return ParsedUri(value, "", value)
    if scheme not in allowed:
        raise ValueError(
            f"{what} URI scheme {scheme!r} is not supported; use one of "
            + ", ".join(f"{s}://" for s in allowed)
            + (" or a hub id / local path" if "hf" in allowed else " or a local path")
        )
    if scheme in ("http", "https"):
        parsed = urllib.parse.urlsplit(value)
        try:
            parsed.port  # noqa: B018 -- urllib checks the port when it is read
        except ValueError:
            raise ValueError(f"{what} URI has an invalid port") from None
        if not parsed.hostname:
            raise ValueError(f"{what} URI {display_uri(value)!r} has no host")
        _check_segments(parsed.path.lstrip("/"), what, value)
        return ParsedUri(value, scheme, rest)  # type: ignore[arg-type]
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not _CLAIM.match(claim) or len(claim) > 253:
            raise ValueError(
                f"{what} URI {value!r} is not of the form pvc://<claim-name>/<path> "
                "(claim names are lowercase DNS labels)"
            )
        _check_segments(sub, what, value)
        return ParsedUri(value, "pvc", sub, claim=claim)
    if not rest.strip("/"):
        raise ValueError(f"{what} URI {value!r} names nothing after {scheme}://")
    _check_segments(rest.lstrip("/") if scheme == "file" else rest, what, value)
    return ParsedUri(value, scheme, rest)  # type: ignore[arg-type]


def _check_segments(path: str, what: str, uri: str) -> None:
    segments = path.rstrip("/").split("/") if path.rstrip("/") else []
    if ".." in segments:
        raise ValueError(f"{what} URI {display_uri(uri)!r} must not contain '..' segments")
    if "" in segments[1:] or (segments and segments[0] == "" and not path.startswith("/")):
        raise ValueError(f"{what} URI {display_uri(uri)!r} must not contain empty path segments")


def display_uri(uri: str) -> str:
    """``uri`` without credentials: userinfo, query string and fragment removed, so it is safe
    in a message, an Event, a model card, a result or status."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return uri
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None  # an invalid port is no secret, but no number either: left out
    if port is not None:
        host = f"{host}:{port}"
    if scheme == "pvc" or scheme in ("s3", "gs", "hf"):
        # Bucket, claim and repo names are the "host" here; keep their case as written.
        netloc = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
