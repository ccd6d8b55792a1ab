"""A small JSON client for the Kubernetes REST API, used by the provisioner.

They speak plain JSON (camelCase, exactly as the API and the YAML users write)
rather than through generated models, which validate fields client-side and
would make its handling of every claim depend on a client version.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from kubetune.local.certs import Pki
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.layout import Layout

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the apiserver."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            message = str(json.loads(body).get("message", body))
        except ValueError:
            message = body
        super().__init__(f"{status}: {message}")


class Rest:
    """Thread-safe JSON access to one apiserver with a client certificate."""

    def __init__(self, server: str, pki: Pki) -> None:
        self.server = server.rstrip("/")
        self._pool = urllib3.PoolManager(ssl_context=pki.admin_context(), maxsize=16, retries=False)
        self._lock = threading.Lock()

    @classmethod
    def for_home(cls, home: Path) -> Rest:
        layout = Layout(home)
        return cls(ClusterInfo.load(layout).server, Pki(layout.pki))

    def _url(self, path: str, params: Mapping[str, Any] | None) -> str:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self.server + path + ("?" + urlencode(query) if query else "")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> JSON:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        response = self._pool.request(
            method, self._url(path, params), body=data, headers=headers, timeout=timeout
        )
        text = response.data.decode(errors="replace")
        if response.status >= 300:
            raise ApiError(response.status, text)
        return json.loads(text) if text else {}

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any) -> JSON:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> JSON:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: Any = None) -> JSON:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, **params: Any) -> Iterator[JSON]:
        """Yield watch events ({"type", "object"}) until the server ends the stream."""
        query = {
            **params,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": 300,
        }
        response = self._pool.request(
            "GET",
            self._url(path, query),
            headers={"Accept": "application/json"},
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=330),
        )
        try:
            if response.status >= 300:
                raise ApiError(response.status, response.read().decode(errors="replace"))
            buffer = b""
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            response.release_conn()


def path_for(
    namespace: str | None,
    resource: str,
    name: str | None = None,
    subresource: str | None = None,
    group: str = "",
) -> str:
    """REST path of a (namespaced) resource; ``group`` is e.g. "coordination.k8s.io/v1"."""
    prefix = f"/apis/{group}" if group else "/api/v1"
    parts = [prefix]
    if namespace:
        parts += ["namespaces", quote(namespace)]
    parts.append(resource)
    if name:
        parts.append(quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)
