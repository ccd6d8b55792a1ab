"""What every route shares: the server's parts, who the caller is (token and namespace), their
access checks, and reading FineTuneJobs — from the watch-backed cache once the caller's own
access review allows the read, else with the caller's token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from kubetune.server import mapping
from kubetune.server.access import AccessCache
from kubetune.server.cache import JobCache, Watch
from kubetune.server.errors import ApiError, bad_request, not_found, unauthorized
from kubetune.server.files import NAMESPACE, FileStore, UrlSigner
from kubetune.server.kube import Kube
from kubetune.server.limits import RateLimiter
from kubetune.server.rendered import RenderedJobs
from kubetune.server.settings import ServerSettings


@dataclass(frozen=True)
class Caller:
    token: str
    namespace: str


@dataclass
class Server:
    settings: ServerSettings
    kube: Kube
    files: FileStore
    signer: UrlSigner
    limiter: RateLimiter
    access: AccessCache
    jobs: JobCache | None  # None: every read is made with the caller's token
    rendered: RenderedJobs = field(init=False)

    def __post_init__(self) -> None:
        self.rendered = RenderedJobs(self.settings.job_template)

    async def require(self, who: Caller, verb: str) -> None:
        """403 unless the caller may ``verb`` FineTuneJobs in their namespace (cached)."""
        if not await self.access.allowed(who.token, who.namespace, verb):
            raise ApiError(
                403, f"forbidden: the caller may not {verb} fine-tuning jobs in this project",
                code="forbidden",
            )  # fmt: skip

    async def _view(self, who: Caller, verb: str) -> Watch | None:
        """The cache, where it holds the namespace and the caller may ``verb`` every job there;
        None (the caller's own request decides) where the review denies or the cache can't."""
        if self.jobs is None or not await self.access.allowed(who.token, who.namespace, verb):
            return None
        return await self.jobs.view(who.namespace)

    async def job(self, who: Caller, job_id: str) -> dict[str, Any]:
        """One job the caller may get: from the cache, else a GET with their token (404s in
        the OpenAI shape)."""
        if not mapping.JOB_ID.match(job_id):
            raise not_found("fine-tuning job", job_id)
        view = await self._view(who, "get")
        if view is not None:
            held = view.jobs.get((who.namespace, job_id))
            if held is not None:
                return held
        return await self.fresh_job(who, job_id)

    async def fresh_job(self, who: Caller, job_id: str) -> dict[str, Any]:
        """The job as the API server has it now, read with the caller's token (before a write,
        whose resourceVersion must be the latest)."""
        if not mapping.JOB_ID.match(job_id):
            raise not_found("fine-tuning job", job_id)
        try:
            job: dict[str, Any] = await self.kube.get_job(who.token, who.namespace, job_id)
        except ApiError as exc:
            if exc.status == 404:
                raise not_found("fine-tuning job", job_id) from None
            raise
        return job

    async def jobs_newest_first(self, who: Caller) -> list[dict[str, Any]]:
        """The namespace's jobs, newest first (creation time, then name): a stable order, so
        ``after`` pages through each job once."""
        view = await self._view(who, "list")
        if view is not None:
            return view.listing(who.namespace, mapping.job_sort_key)
        jobs = await self.kube.list_jobs(who.token, who.namespace)
        return sorted(jobs, key=mapping.job_sort_key, reverse=True)

    def wrote(self, job: dict[str, Any]) -> dict[str, Any]:
        """A job the caller just created or patched: into the cache at once (read your writes)."""
        if self.jobs is not None:
            self.jobs.observe(job)
        return job


async def caller(request: Request) -> Caller:
    """Who asks, and in which namespace: the bearer token (their Kubernetes credential, kept for
    this request only) and the OpenAI-Project header, else the configured default. (``async``
    as every dependency here: FastAPI runs a plain ``def`` in a worker thread, a hop a call. The
    headers read as they are: declared as ``Header()`` parameters, FastAPI's per-call checks of
    them were a fifth of a retrieve's CPU.)"""
    server: Server = request.app.state.server
    headers = request.headers
    authorization, openai_project = headers.get("authorization"), headers.get("openai-project")
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized()
    if not server.limiter.allow(token):
        raise ApiError(429, "too many requests; slow down", code="rate_limit_exceeded")
    namespace = openai_project or server.settings.default_namespace
    if not namespace:
        raise bad_request("no project: send the OpenAI-Project header (the namespace)")
    if not NAMESPACE.match(namespace):
        raise bad_request("the project must be a namespace name", code="invalid_project")
    return Caller(token, namespace)


async def the_server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


CallerDep = Annotated[Caller, Depends(caller)]
ServerDep = Annotated[Server, Depends(the_server)]


def list_of(data: list[Any], has_more: bool) -> dict[str, Any]:
    """OpenAI's list envelope."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise bad_request("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


__all__ = ["Caller", "CallerDep", "Server", "ServerDep", "json_body", "list_of"]
