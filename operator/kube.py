"""A thin JSON client to the API server: manifests stay plain dicts.

The generated typed client would turn every manifest into models and back; the operator renders
and derives plain data, so it speaks JSON paths instead. Where the API server is, its TLS and the
credentials come from the kubernetes package's configuration (in-cluster or the kubeconfig);
each thread sends its requests over one kept-alive TLS connection of its own, HTTP/1.1 spoken by
``Wire`` (``wire.py``): urllib3's pool and the client's REST layer cost about as much CPU per
request again, ``http.client`` half as much again (0.31 against 0.20 ms; docs/performance.md).
Through a proxy, the kubernetes package's own REST client.
"""

from __future__ import annotations

import http.client
import json
import socket
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
from kubetune.operator.wire import Answer, Wire

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
        #: The Host header: the server's address as configured (no credentials in it).
        self._host_header = target.netloc.rpartition("@")[2]
        self._local = threading.local()

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        *,
        read_answer: bool = True,
    ) -> Manifest:
        """One request; the object the server answers with (``read_answer`` False: not
        parsed, ``{}``, for a write whose answer nobody reads)."""
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
        if not 200 <= status < 300:
            text = data.decode() if data else ""
            raise ApiException.from_response(http_resp=answer, body=text, data=None)
        return json.loads(data) if data and read_answer else {}

    def _send(
        self, method: str, target: str, payload: bytes | None, headers: dict[str, str]
    ) -> Answer:
        """One request over this thread's kept-alive connection (opened when there is none, or
        when the server closed it while it sat idle). A kept connection that breaks before its
        answer is opened again once: the server may close an idle connection at any moment."""
        wire: Wire | None = getattr(self._local, "wire", None)
        kept = wire is not None and wire.idle_and_open()
        if wire is None or not kept:
            if wire is not None:
                wire.close()
            wire = self._local.wire = self._connect()
        try:
            return self._exchange(wire, method, target, payload, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not kept:
                raise
        wire = self._local.wire = self._connect()
        return self._exchange(wire, method, target, payload, headers)

    def _exchange(
        self, wire: Wire, method: str, target: str, payload: bytes | None, headers: dict[str, str]
    ) -> Answer:
        """One exchange over ``wire``, dropped where it broke or the server closes it after."""
        try:
            answer, keep = wire.exchange(method, target, payload, headers)
        except BaseException:
            self._drop(wire)
            raise
        if not keep:
            self._drop(wire)
        return answer

    def _drop(self, wire: Wire) -> None:
        wire.close()
        if getattr(self._local, "wire", None) is wire:
            self._local.wire = None

    def _connect(self) -> Wire:
        host, port = self._target.hostname or "", self._target.port
        port = port or (443 if self._tls is not None else 80)
        sock = socket.create_connection((host, port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._server_name or host)
        except BaseException:
            sock.close()
            raise
        return Wire(sock, self._host_header)

    def _send_through_client(
        self, method: str, path: str, body: Obj | None, headers: dict[str, str]
    ) -> Answer:
        response = self.api.rest_client.request(
            method,
            self.api.configuration.host + path,
            headers=headers,
            body=body,
            _request_timeout=self.timeout,
        )
        response.read()
        fields = [(str(k), str(v)) for k, v in response.headers.items()]
        return Answer(response.status, response.reason, response.data or b"", fields)

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

    def auth_headers(self) -> dict[str, str]:
        """The credentials' headers for a request of another client (the informers')."""
        return self._auth_headers()

    def endpoint(self) -> tuple[str, ssl.SSLContext | None, str | None, str | None]:
        """Where the API server is, for a client of its own (the informers' aiohttp): its base
        URL, the TLS context (None: plain HTTP), the TLS server name and the proxy, as the
        kubernetes package's configuration says."""
        configuration = self.api.configuration
        proxy = configuration.proxy or None
        return configuration.host.rstrip("/"), self._tls, self._server_name, proxy

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

    def create_or_existing(
        self, manifest: Obj, *, read_answer: bool = True
    ) -> tuple[Manifest, bool]:
        """Create ``manifest``: (the object, True); if it exists already (409), (the existing
        object, False). ``read_answer`` False: the created object is not parsed (``{}``)."""
        meta = manifest["metadata"]
        path = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        try:
            return self.request("POST", path, body=manifest, read_answer=read_answer), True
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

    def merge_patch(self, path: str, patch: Obj, *, read_answer: bool = True) -> Manifest:
        return self.request(
            "PATCH", path, body=patch, content_type=MERGE_PATCH, read_answer=read_answer
        )

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
