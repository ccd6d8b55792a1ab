"""URIs of models, datasets and outputs: parsed once, here, into a typed result.

The API models validate with :func:`parse_uri`, the operator reads the claims to mount from it,
and the trainer resolves it to a path or a remote. A URI is a scheme (``hf``, ``s3``, ``gs``,
``pvc``, ``https``, ``http``, ``file``, ``oci``) or, with no scheme, a hub id or a local path.
``oci://<registry>/<repository>[:<tag>]`` names an OCI registry's repository, in the grammar of
distribution's reference package (lowercase path components, a tag of at most 128 characters).

Paths are refused when they could leave where they point: ``..`` segments, empty segments and
NUL or other control characters, in every URI.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

Scheme = Literal["", "hf", "s3", "gs", "pvc", "https", "http", "file", "oci"]
Kind = Literal["hub-or-path", "hub", "object-store", "pvc", "http", "file", "registry"]

MODEL_SCHEMES: Final[tuple[Scheme, ...]] = ("hf", "s3", "gs", "pvc", "file")
DATASET_SCHEMES: Final[tuple[Scheme, ...]] = (*MODEL_SCHEMES, "https", "http")
OUTPUT_SCHEMES: Final[tuple[Scheme, ...]] = ("s3", "gs", "pvc", "file", "oci")
#: Where a run may start from an adapter (model.adapter): a pushed one by its digest, too.
ADAPTER_SCHEMES: Final[tuple[Scheme, ...]] = ("hf", "s3", "gs", "pvc", "file", "oci")
#: Where an oci:// output keeps its checkpoints (a registry holds the finished adapter only).
CHECKPOINT_SCHEMES: Final[tuple[Scheme, ...]] = ("s3", "gs", "pvc", "file")
#: The schemes a pod in a cluster may use; file:// and plain paths are for `kubetune train`.
CLUSTER_SCHEMES: Final[frozenset[str]] = frozenset(
    {"hf", "s3", "gs", "pvc", "https", "http", "oci"}
)

_KINDS: Final[dict[str, Kind]] = {
    "": "hub-or-path",
    "hf": "hub",
    "s3": "object-store",
    "gs": "object-store",
    "pvc": "pvc",
    "https": "http",
    "http": "http",
    "file": "file",
    "oci": "registry",
}
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: distribution's reference grammar: a registry host (DNS name or IPv4, optional port), path
#: components of lowercase letters and digits joined by one separator, an optional tag.
_OCI_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_OCI_HOST = rf"{_OCI_LABEL}([.]{_OCI_LABEL})*(:[0-9]{{1,5}})?"
_OCI_COMPONENT = r"[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*"
_OCI_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
#: The whole reference, in a form both Python's re and the apiserver's RE2 read (the CRD's rule).
OCI_REFERENCE = rf"^oci://{_OCI_HOST}/{_OCI_COMPONENT}(/{_OCI_COMPONENT})*(:{_OCI_TAG})?$"
_OCI_DIGEST = r"sha256:[a-f0-9]{64}"
#: A reference to pull: a tag or a digest.
OCI_PULL_REFERENCE = (
    rf"^oci://{_OCI_HOST}/{_OCI_COMPONENT}(/{_OCI_COMPONENT})*(:{_OCI_TAG}|@{_OCI_DIGEST})?$"
)
_OCI = re.compile(
    rf"^oci://(?P<host>{_OCI_HOST})/(?P<repository>{_OCI_COMPONENT}(/{_OCI_COMPONENT})*)"
    rf"(:(?P<tag>{_OCI_TAG})|@(?P<digest>{_OCI_DIGEST}))?$"
)
#: The longest repository name distribution accepts (host excluded).
_OCI_MAX_NAME = 255
#: The tag a reference without one gets, as every OCI client does.
DEFAULT_TAG: Final = "latest"
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


def parse_uri(
    value: str, allowed: Iterable[str], what: str, *, oci_digest: bool = False
) -> ParsedUri:
    """Parse ``value`` as a ``what`` URI (model, dataset, output) with one of ``allowed``
    schemes or none (``oci_digest``: an oci:// reference may name a digest, as one to pull
    does); ValueError with a message that names the rule it breaks."""
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
    if scheme == "oci":
        oci_reference(value, what, pull=oci_digest)
        return ParsedUri(value, "oci", rest)
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


@dataclass(frozen=True)
class OciReference:
    """``oci://<host>/<repository>[:<tag>]`` taken apart; the tag defaults to ``latest``."""

    host: str
    repository: str
    tag: str
    #: For a reference pulled by digest (``oci://host/repository@sha256:...``).
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What the registry's manifest endpoint takes: the digest, else the tag."""
        return self.digest or self.tag

    def pinned(self, digest: str) -> str:
        """The reference by digest, as status shows it: ``oci://host/repository@sha256:...``."""
        return f"oci://{self.host}/{self.repository}@{digest}"

    @property
    def tagged(self) -> str:
        return f"oci://{self.host}/{self.repository}:{self.tag}"


def oci_reference(value: str, what: str, *, pull: bool = False) -> OciReference:
    """Parse an ``oci://`` URI (``pull``: a tag or a digest, else a tag to push to); ValueError
    with a message that names the rule it breaks."""
    found = _OCI.match(value)
    if found is not None and found["digest"] and not pull:
        found = None
    if found is None:
        if pull:
            raise ValueError(
                f"{what} URI {display_uri(value)!r} is not of the form "
                "oci://<registry>[:<port>]/<repository>[:<tag>|@sha256:<digest>] (repository "
                "path components are lowercase letters and digits joined by '.', '_', '__' or "
                "'-'; no credentials)"
            )
        raise ValueError(
            f"{what} URI {display_uri(value)!r} is not of the form "
            "oci://<registry>[:<port>]/<repository>[:<tag>] (repository path components are "
            "lowercase letters and digits joined by '.', '_', '__' or '-'; no credentials, no "
            "digest: a push is by tag)"
        )
    repository = found["repository"]
    if len(repository) > _OCI_MAX_NAME:
        raise ValueError(f"{what} URI's repository name is longer than {_OCI_MAX_NAME} characters")
    return OciReference(
        found["host"].lower(), repository, found["tag"] or DEFAULT_TAG, found["digest"]
    )


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
