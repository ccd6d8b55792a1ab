"""The Kubernetes API with a token per request: the caller's bearer token, so RBAC and admission
decide exactly as they do for kubectl (the job cache's LIST and WATCH pass the server's own
read-only token the same way). Only where the API server is and its CA come from the
configuration, never a kubeconfig's credentials."""

from __future__ import annotations

import base64
import json as jsonlib
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from kubetune.server.errors import ApiError, unauthorized

GROUP = "kubetune.io"
VERSION = "v1alpha1"
PLURAL = "finetunejobs"
IN_CLUSTER_CA = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how to trust it."""

    url: str
    verify: ssl.SSLContext | bool


def endpoint_from_kubeconfig(path: Path) -> Endpoint:
    """The current context's cluster: server URL and CA; the kubeconfig's users are ignored."""
    config = yaml.safe_load(path.read_text())
    contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
    clusters = {c["name"]: c["cluster"] for c in config.get("clusters") or []}
    context = contexts[config["current-context"]]
    cluster = clusters[context["cluster"]]
    if cluster.get("insecure-skip-tls-verify"):
        return Endpoint(cluster["server"], False)
    context_ssl = ssl.create_default_context()
    if "certificate-authority-data" in cluster:
        pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
        context_ssl = ssl.create_default_context(cadata=pem)
    elif "certificate-authority" in cluster:
        ca = Path(cluster["certificate-authority"])
        if not ca.is_absolute():
            ca = path.parent / ca
        context_ssl = ssl.create_default_context(cafile=str(ca))
    return Endpoint(cluster["server"], context_ssl)


def endpoint_in_cluster(ca_file: Path | None = None) -> Endpoint:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    return Endpoint(
        f"https://{host}:{port}", ssl.create_default_context(cafile=str(ca_file or IN_CLUSTER_CA))
    )


def _api_error(response: httpx.Response, verb: str, what: str) -> ApiError:
    status = response.status_code
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = ""
    if status == 401:
        return unauthorized()
    if status == 403:
        denied = message.partition("denied request: ")[2]
        if denied:
            # An admission policy's own words (the references policy: "spec.model.uri: you may
            # not get PersistentVolumeClaim ..."): they name the field, not the caller.
            return ApiError(403, denied, code="forbidden")
        # RBAC's message names the caller; say what was refused, not who asked.
        return ApiError(403, f"forbidden: the caller may not {verb} {what}", code="forbidden")
    if status == 404:
        return ApiError(404, f"{what} not found", code="not_found")
    if status == 409:
        return ApiError(409, f"{what}: conflict ({message})", code="conflict")
    if status in {400, 422}:
        # Validation (schema, CEL, admission policies): the message names the field.
        return ApiError(400, message or f"the API server refused to {verb} {what}", "invalid")
    if status == 429:
        return ApiError(429, "the API server is throttling requests; retry", code="rate_limited")
    return ApiError(502, f"the API server answered {status} to {verb} {what}", code="upstream")


#: Connections to the API server at most (httpx's default), each kept alive between requests.
MAX_CONNECTIONS = 100


class Kube:
    """A pooled HTTP client to the API server; each call takes the caller's token."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        # Every connection kept alive: httpx keeps 20 by default, so with more callers at once
        # each request past the 20th paid a new TLS handshake on both sides (docs/performance.md).
        self.client = httpx.AsyncClient(
            base_url=endpoint.url, verify=endpoint.verify, timeout=timeout, trust_env=False,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                max_keepalive_connections=MAX_CONNECTIONS),
        )  # fmt: skip

    async def close(self) -> None:
        await self.client.aclose()

    def credentials(self, token: str) -> dict[str, str]:
        """The headers that carry the caller's identity to the API server."""
        return {"Authorization": f"Bearer {token}"}

    async def request(
        self,
        token: str,
        method: str,
        path: str,
        *,
        verb: str,
        what: str,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {**self.credentials(token), "Accept": "application/json"}
        if json is not None:
            headers["Content-Type"] = content_type
        try:
            response = await self.client.request(
                method, path, json=json, params=params, headers=headers
            )
        except httpx.TimeoutException:
            raise ApiError(504, "the API server did not answer in time", "timeout") from None
        except httpx.HTTPError:
            raise ApiError(502, "the API server can't be reached", "upstream") from None
        if response.status_code >= 300:
            raise _api_error(response, verb, what)
        if response.headers.get("content-type", "").startswith("text/plain"):
            return response.text
        return response.json()

    async def watch(
        self, token: str, path: str, resource_version: str, seconds: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of ``path`` from ``resource_version`` (bookmarks asked for), one
        decoded event a line, until the API server ends the watch after ``seconds``."""
        params = {
            "watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }  # fmt: skip
        headers = {**self.credentials(token), "Accept": "application/json"}
        timeout = httpx.Timeout(self.client.timeout.connect, read=seconds + 30.0)
        request = self.client.build_request(
            "GET", path, params=params, headers=headers, timeout=timeout
        )
        response = await self.client.send(request, stream=True)
        try:
            if response.status_code >= 300:
                await response.aread()
                raise _api_error(response, "watch", "finetunejobs")
            async for line in response.aiter_lines():
                if line.strip():
                    yield jsonlib.loads(line)
        finally:
            await response.aclose()

    # --- FineTuneJobs ---------------------------------------------------------------------

    @staticmethod
    def jobs_path(namespace: str | None) -> str:
        """The FineTuneJobs of ``namespace``, or of every namespace (None)."""
        if namespace is None:
            return f"/apis/{GROUP}/{VERSION}/{PLURAL}"
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"

    def _jobs(self, namespace: str) -> str:
        return self.jobs_path(namespace)

    async def create_job(self, token: str, namespace: str, manifest: dict[str, Any]) -> Any:
        return await self.request(
            token, "POST", self._jobs(namespace), verb="create", what="finetunejobs", json=manifest
        )

    async def get_job(self, token: str, namespace: str, name: str) -> Any:
        return await self.request(
            token, "GET", f"{self._jobs(namespace)}/{name}", verb="get",
            what=f"fine-tuning job {name!r}",
        )  # fmt: skip

    async def list_jobs(self, token: str, namespace: str) -> list[dict[str, Any]]:
        body = await self.request(
            token, "GET", self._jobs(namespace), verb="list", what="finetunejobs"
        )
        items: list[dict[str, Any]] = body.get("items") or []
        return items

    async def patch_job(self, token: str, namespace: str, name: str, patch: Any) -> Any:
        return await self.request(
            token,
            "PATCH",
            f"{self._jobs(namespace)}/{name}",
            verb="patch",
            what=f"fine-tuning job {name!r}",
            json=patch,
            content_type="application/merge-patch+json",
        )

    async def list_job_events(self, token: str, namespace: str, name: str) -> list[Any]:
        selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
        body = await self.request(
            token,
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            verb="list",
            what="events",
            params={"fieldSelector": selector},
        )
        items: list[Any] = body.get("items") or []
        return items

    async def list_all_jobs(self, token: str) -> list[dict[str, Any]]:
        """Every namespace's FineTuneJobs (403 unless the caller may list them cluster-wide)."""
        body = await self.request(
            token, "GET", self.jobs_path(None), verb="list", what="finetunejobs"
        )
        items: list[dict[str, Any]] = body.get("items") or []
        return items

    async def list_namespaces(self, token: str) -> list[str]:
        body = await self.request(
            token, "GET", "/api/v1/namespaces", verb="list", what="namespaces"
        )
        return [str(n["metadata"]["name"]) for n in body.get("items") or []]

    async def pod_log(
        self, token: str, namespace: str, pod: str, container: str, lines: int
    ) -> str:
        """The last ``lines`` lines of a container's log (``pods/log``, as ``kubectl logs``)."""
        text = await self.request(
            token, "GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", verb="get",
            what="the trainer's log", params={"container": container, "tailLines": str(lines)},
        )  # fmt: skip
        return str(text)

    async def username(self, token: str) -> str:
        """Who the token is (a SelfSubjectReview: any authenticated caller may make one; 401
        for a token the API server refuses)."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        body = await self.request(
            token, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", verb="review",
            what="identity", json=review,
        )  # fmt: skip
        user = ((body.get("status") or {}).get("userInfo") or {}).get("username")
        return str(user or "")

    # --- authorization of what isn't a Kubernetes object (uploaded files) -----------------

    async def may(self, token: str, namespace: str, verb: str) -> bool:
        """Whether the caller may ``verb`` FineTuneJobs in ``namespace`` (a
        SelfSubjectAccessReview made with the caller's own token: 401 for a bad token)."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "group": GROUP,
                    "resource": PLURAL,
                    "verb": verb,
                    "namespace": namespace,
                }
            },
        }
        body = await self.request(
            token,
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            verb="review",
            what="access",
            json=review,
        )
        return bool((body.get("status") or {}).get("allowed"))


__all__ = ["Endpoint", "Kube", "endpoint_from_kubeconfig", "endpoint_in_cluster"]
