"""The OCI distribution API over urllib, for one repository of one registry, and its logins.

Monolithic blob uploads, a manifest put by tag, blobs and manifests fetched and checked against
their digests, and Basic or token (Bearer) authentication from a docker config file (what a
``kubernetes.io/dockerconfigjson`` Secret holds). Credentials go only to the registry's own host
and, for a token, to the realm the registry names over https; never into a message, a log line
or the result. Plain http only where the spec says so (and the operator allowed it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kubetune.api.contract import REGISTRY_AUTH_ENV
from kubetune.api.uris import OciReference

log = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPE: Final = "application/vnd.oci.image.manifest.v1+json"
TIMEOUT_SECONDS: Final = 120


class RegistryError(Exception):
    """A push that failed; the message names the registry, the step and the HTTP status, never a
    credential nor text the registry sent beyond its error codes."""


# --- credentials -------------------------------------------------------------------------------


def auth_file() -> Path | None:
    """The docker config file to read: ``$REGISTRY_AUTH_FILE`` (the pod gets its Secret there),
    else ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json`` where one exists."""
    named = os.environ.get(REGISTRY_AUTH_ENV)
    if named:
        return Path(named)
    folder = os.environ.get("DOCKER_CONFIG")
    default = Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"
    return default if default.is_file() else None


def _auth_entries(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a JSON docker config"
        raise RegistryError(f"cannot read the registry credentials {path}: {why}") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    return auths if isinstance(auths, dict) else {}


def _entry_host(key: str) -> str:
    """``https://host/v1/`` or ``host`` as a docker config's key → ``host``."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


@dataclass(frozen=True)
class Login:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Login(username={self.username!r}, password=***)"

    @property
    def basic(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def login_for(host: str, path: Path | None) -> Login:
    """The docker config's login for ``host`` (none: anonymous)."""
    for key, entry in _auth_entries(path).items():
        if _entry_host(key) != host.lower() or not isinstance(entry, dict):
            continue
        username, password = entry.get("username"), entry.get("password")
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                username, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                raise RegistryError(
                    f"the registry credentials for {host} have an 'auth' that is not base64 of "
                    "user:password"
                ) from None
        token = entry.get("identitytoken")
        return Login(
            username if isinstance(username, str) else None,
            password if isinstance(password, str) else None,
            token if isinstance(token, str) and token else None,
        )
    return Login()


def registry_secrets(path: Path | None = None) -> list[str]:
    """Every secret value of the docker config (passwords, auth strings, tokens): never shown."""
    try:
        entries = _auth_entries(path if path is not None else auth_file())
    except RegistryError:
        return []
    values: list[str] = []
    for entry in entries.values():
        if not isinstance(entry, dict):
            continue
        for name in ("auth", "password", "identitytoken", "registrytoken"):
            value = entry.get(name)
            if isinstance(value, str) and value:
                values.append(value)
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            with contextlib.suppress(ValueError):
                values.append(base64.b64decode(encoded).decode().partition(":")[2])
    return [v for v in values if v]


# --- the distribution API ----------------------------------------------------------------------


class RegistryClient:
    """One repository of one registry, as the OCI distribution spec describes its API."""

    def __init__(self, reference: OciReference, *, plain_http: bool, login: Login) -> None:
        self.reference = reference
        self.base = f"{'http' if plain_http else 'https'}://{reference.host}"
        self.login = login
        self.shown = f"{reference.host}/{reference.repository}"
        self._authorization: str | None = None
        self._opener = urllib.request.build_opener(_NoRedirects())

    def push_blob(self, digest: str, size: int, content: Path | bytes) -> None:
        repository = self.reference.repository
        head = self._request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", "check a blob", ok=(200, 404)
        )
        if head.status == 200:
            return
        started = self._request(
            "POST", f"/v2/{repository}/blobs/uploads/", "start an upload", ok=(202,)
        )
        location = started.headers.get("Location")
        if not location:
            raise RegistryError(
                f"{self.shown}: the registry started an upload but named no location"
            )
        target = urllib.parse.urljoin(self.base + "/", location)
        if urllib.parse.urlsplit(target).netloc != urllib.parse.urlsplit(self.base).netloc:
            raise RegistryError(f"{self.shown}: the registry sent the upload to another host")
        separator = "&" if "?" in target else "?"
        url = f"{target}{separator}digest={urllib.parse.quote(digest)}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(content, bytes):
            self._request("PUT", url, "upload a blob", ok=(201,), data=content, headers=headers)
            return
        with content.open("rb") as handle:
            self._request(
                "PUT", url, f"upload {content.name}", ok=(201,), data=handle, headers=headers
            )

    def start_and_cancel_upload(self) -> None:
        started = self._request(
            "POST", f"/v2/{self.reference.repository}/blobs/uploads/", "start an upload", ok=(202,)
        )
        location = started.headers.get("Location")
        if location:
            target = urllib.parse.urljoin(self.base + "/", location)
            if urllib.parse.urlsplit(target).netloc == urllib.parse.urlsplit(self.base).netloc:
                # Best effort: a registry that keeps the empty upload expires it.
                with contextlib.suppress(RegistryError):
                    self._request("DELETE", target, "cancel the upload", ok=(204, 404, 405))

    def get_manifest(self) -> bytes:
        path = f"/v2/{self.reference.repository}/manifests/{self.reference.reference}"
        answer = self._request(
            "GET", path, "get the manifest", ok=(200,), headers={"Accept": MANIFEST_MEDIA_TYPE}
        )
        return answer.body

    def get_blob(self, digest: str, size: int, path: Path) -> None:
        """The blob into ``path``, its size and digest checked. A registry may send the download
        elsewhere (a 307 to its storage, as GHCR and S3-backed registries do): followed once,
        without the registry's login (the storage URL carries its own signature)."""
        answer = self._request(
            "GET", f"/v2/{self.reference.repository}/blobs/{digest}", f"get {path.name}",
            ok=(200, 301, 302, 303, 307, 308),
        )  # fmt: skip
        body = answer.body
        if answer.status != 200:
            location = answer.headers.get("Location", "")
            target = urllib.parse.urljoin(self.base + "/", location)
            if urllib.parse.urlsplit(target).scheme not in ("https", "http") or not location:
                raise RegistryError(f"{self.shown}: {path.name} was redirected nowhere usable")
            request = urllib.request.Request(target, headers={"User-Agent": "kubetune-trainer"})  # noqa: S310
            try:
                with self._opener.open(request, timeout=TIMEOUT_SECONDS) as redirected:
                    body = redirected.read(size + 1)
            except (urllib.error.URLError, OSError) as exc:
                why = exc.code if isinstance(exc, urllib.error.HTTPError) else type(exc).__name__
                raise RegistryError(
                    f"{self.shown}: the storage the registry sent {path.name} to answered {why}"
                ) from None
        if len(body) != size or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"{self.shown}: {path.name} does not match its digest")
        path.write_bytes(body)

    def put_manifest(self, body: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        response = self._request(
            "PUT",
            f"/v2/{self.reference.repository}/manifests/{self.reference.tag}",
            "put the manifest",
            ok=(201,),
            data=body,
            headers={"Content-Type": MANIFEST_MEDIA_TYPE},
        )
        answered = response.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise RegistryError(
                f"{self.shown}: the registry stored the manifest as {answered}, not {digest}"
            )
        return digest

    # --- requests, with authentication ---------------------------------------------------------

    def _request(
        self,
        method: str,
        path_or_url: str,
        step: str,
        *,
        ok: tuple[int, ...],
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Response:
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        response = self._send(method, url, data, headers)
        if response.status == 401:
            self._authorization = self._authenticate(response.headers.get("WWW-Authenticate", ""))
            if hasattr(data, "seek"):
                data.seek(0)
            response = self._send(method, url, data, headers)
        if response.status == 401:
            raise RegistryError(
                f"{self.shown}: the registry refused the login to {step} (HTTP 401); check the "
                "Secret output.registry.credentialsSecretRef names"
            )
        if response.status not in ok:
            codes = ", ".join(response.error_codes) or "no error code"
            why = {401: "unauthorized", 403: "denied"}.get(response.status, "refused")
            raise RegistryError(f"{self.shown}: {step} was {why} (HTTP {response.status}: {codes})")
        return response

    def _send(
        self, method: str, url: str, data: Any, headers: Mapping[str, str] | None
    ) -> _Response:
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        request.add_header("User-Agent", "kubetune-trainer")
        if self._authorization:
            # Unredirected: no redirect (refused anyway) carries it elsewhere.
            request.add_unredirected_header("Authorization", self._authorization)
        try:
            with self._opener.open(request, timeout=TIMEOUT_SECONDS) as answer:
                return _Response(answer.status, answer.headers, answer.read())
        except urllib.error.HTTPError as exc:
            return _Response(exc.code, exc.headers, exc.read() if exc.fp is not None else b"")
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            why = (
                reason.strerror
                if isinstance(reason, OSError) and reason.strerror
                else type(reason).__name__
            )
            raise RegistryError(f"{self.shown}: cannot reach {self.base}: {why}") from None

    def _authenticate(self, challenge: str) -> str:
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            basic = self.login.basic
            if basic is None:
                raise RegistryError(
                    f"{self.shown}: the registry asks for a login and the credentials "
                    "(output.registry.credentialsSecretRef) have none for "
                    f"{self.reference.host}"
                )
            return basic
        if scheme.lower() != "bearer":
            raise RegistryError(f"{self.shown}: unsupported authentication scheme {scheme!r}")
        params = _challenge_params(rest)
        realm = params.get("realm", "")
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme not in ("https", "http") or not realm_parts.netloc:
            raise RegistryError(f"{self.shown}: the registry named no token service")
        same_host = realm_parts.netloc == urllib.parse.urlsplit(self.base).netloc
        if realm_parts.scheme != "https" and not same_host:
            raise RegistryError(
                f"{self.shown}: the registry's token service is plain http on another host"
            )
        scope = params.get("scope") or f"repository:{self.reference.repository}:pull,push"
        query = {"scope": scope}
        if "service" in params:
            query["service"] = params["service"]
        request = urllib.request.Request(  # noqa: S310 -- https, or the registry's own host
            f"{realm}{'&' if '?' in realm else '?'}{urllib.parse.urlencode(query)}"
        )
        if self.login.identity_token is not None:
            request = urllib.request.Request(  # noqa: S310
                realm,
                data=urllib.parse.urlencode(
                    {**query, "grant_type": "refresh_token", "client_id": "kubetune",
                     "refresh_token": self.login.identity_token}
                ).encode(),
                method="POST",
            )  # fmt: skip
        elif self.login.basic is not None:
            request.add_unredirected_header("Authorization", self.login.basic)
        try:
            with self._opener.open(request, timeout=TIMEOUT_SECONDS) as answer:
                document = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise RegistryError(
                f"{self.shown}: the token service refused the login (HTTP {exc.code})"
            ) from None
        except (urllib.error.URLError, OSError, ValueError):
            raise RegistryError(f"{self.shown}: the token service gave no token") from None
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.shown}: the token service gave no token")
        return f"Bearer {token}"


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Any
    body: bytes

    @property
    def error_codes(self) -> list[str]:
        """The registry's error codes (the spec's fixed vocabulary: DENIED, NAME_UNKNOWN, ...);
        its messages stay out, as they may quote anything."""
        try:
            errors = json.loads(self.body).get("errors", [])
        except (ValueError, AttributeError):
            return []
        codes = [e.get("code") for e in errors if isinstance(e, dict)]
        return [c for c in codes if isinstance(c, str) and c.replace("_", "").isalnum()][:3]


def _challenge_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in _split_params(text):
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return params


def _split_params(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect's target is the registry's choice: not followed (blob reads are not needed)."""

    def redirect_request(  # noqa: PLR0917 -- urllib's signature
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        return None
