"""A thin JSON client over the kubernetes package's ApiClient: manifests stay plain dicts.

The generated typed client would turn every manifest into models and back; the operator renders
and derives plain data, so it speaks JSON paths instead (auth and TLS come from ApiClient).
"""

from __future__ import annotations

import json
import time
from typing import Final
from urllib.parse import quote, urlencode

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


class Kube:
    """GET, POST, PATCH and DELETE of JSON objects; failures raise ApiException."""

    def __init__(self, api: client.ApiClient, timeout: float = 30.0) -> None:
        self.api = api
        #: Seconds a request may take: a connection that went silent fails it (and a retry
        #: opens a new one) instead of holding a worker.
        self.timeout = timeout
        self._auth: tuple[float, dict[str, str]] | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Manifest:
        url = self.api.configuration.host + path
        if query:
            url += "?" + urlencode(query)
        headers = {"Accept": "application/json", "Content-Type": content_type}
        headers.update(self._auth_headers())
        try:
            response = self.api.rest_client.request(
                method,
                url,
                headers=headers,
                body=body,
                _request_timeout=self.timeout,
            )
        except Exception:
            API_REQUESTS.labels(method, resource_of(path), "0").inc()
            API_ERRORS.labels(method, "0").inc()
            raise
        response.read()
        API_REQUESTS.labels(method, resource_of(path), str(response.status)).inc()
        if response.status >= 400:
            API_ERRORS.labels(method, str(response.status)).inc()
        text = response.data.decode() if response.data else ""
        if not 200 <= response.status < 300:
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        return json.loads(text) if text else {}

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
