"""Datasets over http(s): the URI's own credentials only, public addresses only, no redirects.

Downloaded with nothing but the URI's own credentials, only from public addresses (or the networks
the settings allow), never through a redirect or a proxy, and never more than the download limit.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.api.contract import DOWNLOAD_ALLOWED_CIDRS_ENV
from kubetune.trainer.errors import InvalidConfig
from kubetune.trainer.locations import cache_dir_for

#: The most bytes an https dataset download may bring (a hostile or mistaken URI could stream
#: without end); 10 GiB unless this says otherwise.
MAX_DOWNLOAD_ENV = "KUBETUNE_MAX_DOWNLOAD_BYTES"
DEFAULT_MAX_DOWNLOAD_BYTES = 10 * 1024**3
#: Per socket operation: connecting, and each read of the body.
HTTP_TIMEOUT_SECONDS = 60
_CHUNK = 1024 * 1024


class DownloadFailed(Exception):
    """An https download that could not be completed; the message names no credential."""


def max_download_bytes() -> int:
    """The most an https dataset download may weigh: ``$KUBETUNE_MAX_DOWNLOAD_BYTES``, 10 GiB
    when unset."""
    value = os.environ.get(MAX_DOWNLOAD_ENV)
    if value is None or not value.strip():
        return DEFAULT_MAX_DOWNLOAD_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise InvalidConfig(f"{MAX_DOWNLOAD_ENV} must be a positive number of bytes, not {value!r}")
    return limit


def fetch_http(uri: str, what: str) -> Path:
    """Download an http(s) file into the local cache, keeping its name (its suffix says its type).

    Nothing but the URI's own credentials goes to the host: no hub token, no netrc, no headers
    from a process-wide opener. Userinfo in the URI becomes HTTP Basic auth for that host only; a
    presigned URL's query string is sent as it is. The host must resolve to public addresses
    only (or to networks ``$KUBETUNE_DOWNLOAD_ALLOWED_CIDRS`` allows), checked on every
    connection, and a redirect is refused: a tenant's URI may not lead the trainer to the
    cluster's or the cloud's private services. The download stops at :func:`max_download_bytes`.
    Every failure is a :class:`DownloadFailed` whose message holds nothing the host sent back
    but its status code.
    """
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host:  # an IPv6 literal goes back in brackets
        netloc = f"[{host}]" if parts.port is None else f"[{host}]:{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    request = urllib.request.Request(url, headers={"User-Agent": "kubetune-trainer"})  # noqa: S310
    if parts.username is not None:
        user, password = parts.username, parts.password or ""
        pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        basic = base64.b64encode(pair.encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {basic}")
    limit = max_download_bytes()
    allowed = download_allowed_networks()
    name = Path(urllib.parse.unquote(parts.path)).name or "data"
    target = cache_dir_for(uri, what) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    # A fresh opener: never one a library installed globally (with its own auth handlers), no
    # proxy from the environment (the address checked must be the one connected to).
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _NoRedirects(),
        _CheckedHTTPHandler(allowed),
        _CheckedHTTPSHandler(allowed),
    )
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise DownloadFailed(
                    f"it is {int(length)} bytes, more than the download limit of {limit} bytes "
                    f"({MAX_DOWNLOAD_ENV})"
                )
            _copy_at_most(response, partial, limit)
    except DownloadFailed:
        partial.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as exc:
        partial.unlink(missing_ok=True)
        # The code only: the reason phrase and the body are the host's words.
        raise DownloadFailed(f"the server answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        partial.unlink(missing_ok=True)
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, DownloadFailed):
            raise reason from None
        if isinstance(reason, TimeoutError):
            why = f"no answer within {HTTP_TIMEOUT_SECONDS} seconds"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror
        else:  # an answer that isn't HTTP: its text stays out of the message
            why = type(reason).__name__
        raise DownloadFailed(f"cannot reach {netloc}: {why}") from None
    partial.replace(target)
    return target


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def download_allowed_networks() -> tuple[Network, ...]:
    """The non-public networks downloads may reach: ``$KUBETUNE_DOWNLOAD_ALLOWED_CIDRS``."""
    value = os.environ.get(DOWNLOAD_ALLOWED_CIDRS_ENV, "")
    networks = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise InvalidConfig(
                f"{DOWNLOAD_ALLOWED_CIDRS_ENV} must be comma-separated CIDRs, not {item!r}"
            ) from None
    return tuple(networks)


def is_public(address: Address) -> bool:
    """Whether ``address`` is on the internet: not private, shared, loopback, link-local,
    unique-local, multicast or reserved, nor an IPv6 form of such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None and not is_public(embedded):
            return False
    if any(address in network for network in _NOT_PUBLIC):
        return False
    return address.is_global and not address.is_multicast


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: Beside what Python calls not global: the IETF block that holds Oracle's metadata address
#: (192.0.0.192), which Python's table leaves global, and the shared range (Alibaba's
#: 100.100.100.200) on versions that differ.
_NOT_PUBLIC = (ipaddress.IPv4Network("192.0.0.0/24"), ipaddress.IPv4Network("100.64.0.0/10"))


def _checked_connection(allowed: tuple[Network, ...]) -> Any:
    """``socket.create_connection`` that connects only to addresses :func:`is_public` or
    ``allowed`` holds, resolving once and connecting to what it checked (no second lookup a
    rebinding DNS server could answer differently)."""

    def connect(
        address: tuple[str, int], timeout: Any = None, source_address: Any = None, **_: Any
    ) -> socket.socket:
        host, port = address
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OSError(exc.errno, exc.strerror or "name not resolved") from None
        last: OSError | None = None
        for family, kind, proto, _name, sockaddr in found:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if not is_public(ip) and not any(ip in net for net in allowed):
                raise DownloadFailed(
                    f"{host} resolves to {ip}, an address that isn't public (private, loopback, "
                    f"link-local or metadata); {DOWNLOAD_ALLOWED_CIDRS_ENV} may allow it"
                )
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return sock
        raise last or OSError(f"{host} has no address")

    return connect


def _connections(kind: type[http.client.HTTPConnection], allowed: tuple[Network, ...]) -> Any:
    """``kind``'s connections, each connecting through :func:`_checked_connection`."""

    def connection(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        made = kind(host, **kwargs)
        # http.client connects through this attribute: the checked connect instead.
        setattr(made, "_create_connection", _checked_connection(allowed))  # noqa: B010
        return made

    return connection


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allowed: tuple[Network, ...]) -> None:
        super().__init__()
        self.allowed = allowed

    def http_open(self, req: Any) -> Any:
        return self.do_open(_connections(http.client.HTTPConnection, self.allowed), req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allowed: tuple[Network, ...]) -> None:
        super().__init__()
        self.allowed = allowed

    def https_open(self, req: Any) -> Any:
        context = getattr(self, "_context", None)
        connections = _connections(http.client.HTTPSConnection, self.allowed)
        return self.do_open(connections, req, context=context)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: where it leads is the host's choice, and it may be anywhere."""

    def redirect_request(  # noqa: PLR0917 -- urllib's signature
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        raise DownloadFailed(f"the server answered HTTP {code}, a redirect; downloads follow none")


def _copy_at_most(response: Any, path: Path, limit: int) -> None:
    copied = 0
    try:
        out = path.open("wb")
    except OSError as exc:
        raise DownloadFailed(f"cannot write to {path.parent}: {exc.strerror}") from None
    with out:
        while chunk := response.read(_CHUNK):
            copied += len(chunk)
            if copied > limit:
                raise DownloadFailed(
                    f"it is more than the download limit of {limit} bytes ({MAX_DOWNLOAD_ENV})"
                )
            try:
                out.write(chunk)
            except OSError as exc:
                raise DownloadFailed(f"cannot write to {path.parent}: {exc.strerror}") from None
