"""A thin JSON client to the API server: manifests stay plain dicts.

The generated typed client would turn every manifest into models and back; the operator renders
and derives plain data, so it speaks JSON paths instead. Where the API server is, its TLS and the
credentials come from the kubernetes package's configuration (in-cluster or the kubeconfig);
each thread sends its requests over one kept-alive connection of its own through the standard
library's ``http.client``: urllib3's pool and the client's REST layer cost about as much CPU per
request again (docs/performance.md). Through a proxy, the kubernetes package's own REST client.
"""

from __future__ import annotations

import http.client
import json
import select
import ssl
import threading
import time
from typing import Final
from urllib.parse import quote, urlencode, urlsplit

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.operator.metrics import API_ERRORS, API_REQUESTS, resource_of
from kubetune.operator.objects import Manifest, Obj

MERGE_PATCH: Final = "application/merge-patch+json"
#: Seconds the credentials' headers are reused before they are taken from the client again.
AUTH_HEADERS_SECONDS: Final = 1.0
_PLURALS: Final = {
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "Event": "events",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "NetworkPolicy": "networkpolicies",
    "Workload": "workloads",
    "JobSet": "jobsets",
}


def load_config(pool_size: int = 32) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # One kept-alive connection per worker thread: a smaller pool discards connections and
    # pays a TLS handshake per request under load.
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{_PLURALS[kind]}"


def finetunejob_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}"
    return f"{path}/{subresource}" if subresource else path


class _HTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose certificate is checked against ``server_name`` (the
    configuration's TLS server name where it has one, else the host)."""

    def __init__(
        self, host: str, port: int | None, timeout: float, tls: ssl.SSLContext, server_name: str
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self._tls = tls
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


class _Answer:
    """An answer read whole: what ApiException.from_response reads of it."""

    __slots__ = ("data", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, data: bytes, headers: object) -> None:
        self.status, self.reason, self.data, self.headers = status, reason, data, headers

    def getheaders(self) -> object:
        return self.headers


def _exchange(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    payload: bytes | None,
    headers: dict[str, str],
) -> _Answer:
    connection.request(method, path, body=payload, headers=headers)
    response = connection.getresponse()
    data = response.read()  # whole: the connection is free for the next request
    return _Answer(response.status, response.reason, data, response.headers)


def _still_open(connection: http.client.HTTPConnection) -> bool:
    """Whether a kept-alive connection can take the next request: it has a socket and nothing
    to read on it (between requests, readable means the server closed it, or is closing it)."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _tls_context(configuration: client.Configuration) -> ssl.SSLContext:
    """The TLS the kubernetes package's REST client would use: its CA, its client certificate,
    its verification settings."""
    context = ssl.create_default_context(
        cafile=configuration.ssl_ca_cert, cadata=configuration.ca_cert_data
    )
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif configuration.assert_hostname is False:
        context.check_hostname = False
    return context


class Kube:
    """GET, POST, PATCH and DELETE of JSON objects; failures raise ApiException (an answer
    outside 2xx) or OSError / http.client.HTTPException (no answer)."""

    def __init__(self, api: client.ApiClient, timeout: float = 30.0) -> None:
        self.api = api
        #: Seconds a request may take: a connection that went silent fails it (and a retry
        #: opens a new one) instead of holding a worker.
        self.timeout = timeout
        self._auth: tuple[float, dict[str, str]] | None = None
        configuration = api.configuration
        target = urlsplit(configuration.host)
        #: Straight to the API server over http.client, unless a proxy is in the way.
        self._direct = not configuration.proxy and target.scheme in ("https", "http")
        self._target = target
        self._tls = _tls_context(configuration) if target.scheme == "https" else None
        self._server_name = configuration.tls_server_name or None
        self._local = threading.local()

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Manifest:
        target = path + "?" + urlencode(query) if query else path
        headers = {"Accept": "application/json", "Content-Type": content_type}
        headers.update(self._auth_headers())
        try:
            if self._direct:
                payload = None if body is None else json.dumps(body).encode()
                answer = self._send(method, target, payload, headers)
            else:
                answer = self._send_through_client(method, target, body, headers)
        except Exception:
            API_REQUESTS.labels(method, resource_of(path), "0").inc()
            API_ERRORS.labels(method, "0").inc()
            raise
        status, data = answer.status, answer.data
        API_REQUESTS.labels(method, resource_of(path), str(status)).inc()
        if status >= 400:
            API_ERRORS.labels(method, str(status)).inc()
        text = data.decode() if data else ""
        if not 200 <= status < 300:
            raise ApiException.from_response(http_resp=answer, body=text, data=None)
        return json.loads(text) if text else {}

    def _send(
        self, method: str, path: str, payload: bytes | None, headers: dict[str, str]
    ) -> _Answer:
        """One request over this thread's kept-alive connection (opened when there is none, or
        when the server closed it while it sat idle). A kept connection that breaks before its
        answer is opened again once: the server may close an idle connection at any moment."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        kept = connection is not None and _still_open(connection)
        if connection is None or not kept:
            if connection is not None:
                connection.close()
            connection = self._local.connection = self._connect()
        try:
            return _exchange(connection, method, path, payload, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            if not kept:
                raise
        except BaseException:
            connection.close()
            raise
        return _exchange(connection, method, path, payload, headers)

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self._target.hostname or "", self._target.port
        if self._tls is None:
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        return _HTTPSConnection(host, port, self.timeout, self._tls, self._server_name or host)

    def _send_through_client(
        self, method: str, path: str, body: Obj | None, headers: dict[str, str]
    ) -> _Answer:
        response = self.api.rest_client.request(
            method,
            self.api.configuration.host + path,
            headers=headers,
            body=body,
            _request_timeout=self.timeout,
        )
        response.read()
        return _Answer(response.status, response.reason, response.data or b"", response.headers)

    def _auth_headers(self) -> dict[str, str]:
        """The credentials' headers, taken again at most every ``AUTH_HEADERS_SECONDS``: the
        kubernetes client's refresh hook (a token read again when it expires, a minute at most
        for a projected one) rebuilds its whole configuration on every call."""
        stamp = time.monotonic()
        cached = self._auth
        if cached is not None and stamp - cached[0] < AUTH_HEADERS_SECONDS:
            return cached[1]
        headers: dict[str, str] = {}
        for setting in self.api.configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[str(setting["key"])] = str(setting["value"])
        self._auth = (stamp, headers)
        return headers

    def get(self, path: str, query: dict[str, str] | None = None) -> Manifest:
        return self.request("GET", path, query=query)

    def get_or_none(self, path: str) -> Manifest | None:
        try:
            return self.get(path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, manifest: Obj) -> Manifest:
        """Create ``manifest``; if it exists already (409), the existing object."""
        return self.create_or_existing(manifest)[0]

    def create_or_existing(self, manifest: Obj) -> tuple[Manifest, bool]:
        """Create ``manifest``: (the object, True); if it exists already (409), (the existing
        object, False)."""
        meta = manifest["metadata"]
        path = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        try:
            return self.request("POST", path, body=manifest), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        return self.get(f"{path}/{quote(meta['name'])}"), False

    def replace(self, manifest: Obj, resource_version: str) -> Manifest:
        """PUT ``manifest`` over the object of its name, if it is still at ``resource_version``
        (else 409)."""
        meta = manifest["metadata"]
        path = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        body = {**manifest, "metadata": {**meta, "resourceVersion": resource_version}}
        return self.request("PUT", f"{path}/{quote(meta['name'])}", body=body)

    def merge_patch(self, path: str, patch: Obj) -> Manifest:
        return self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    def delete(self, path: str, propagation: str = "Background") -> None:
        try:
            self.request(
                "DELETE",
                path,
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
