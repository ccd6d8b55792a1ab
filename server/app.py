"""The HTTP app: its parts built from the settings, the request limits and access log, the
OpenAI error shape, and the routes — files_api.py and jobs_api.py under ``/v1``, the web console
under ``/ui`` (console.py). Every write and access review is the caller's (``kube.Kube`` with
their bearer token); the server's own identity only fills the read-only job cache."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as FormFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.server import console, files_api, jobs_api
from kubetune.server.access import AccessCache
from kubetune.server.cache import JobCache
from kubetune.server.context import Server
from kubetune.server.errors import ApiError, bad_request
from kubetune.server.files import FileStore, UrlSigner
from kubetune.server.kube import Kube, endpoint_from_kubeconfig, endpoint_in_cluster
from kubetune.server.limits import MULTIPART_OVERHEAD, BodyLimit, RateLimiter
from kubetune.server.settings import ServerSettings

log = logging.getLogger("kubetune.server")


class AccessLog:
    """One line a request: method, the route's template only (no namespace, id, query string —
    signatures — or header), status and time. A plain ASGI middleware: FastAPI's
    ``@app.middleware("http")`` would add a task and a body copy to every call."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            log.info(
                "%s %s %d %.1fms", scope["method"], getattr(route, "path", "?"), status,
                1000 * (time.monotonic() - started),
            )  # fmt: skip


def new_server(settings: ServerSettings, kube: Kube | None = None) -> Server:
    """The server's parts from its settings: the API server's client, the file store, the URL
    signer, the rate limiter, the access cache and (given the server's own token) the job cache."""
    if kube is None:
        endpoint = (
            endpoint_from_kubeconfig(settings.kubeconfig)
            if settings.kubeconfig
            else endpoint_in_cluster(settings.ca_file)
        )
        kube = Kube(endpoint, settings.kube_timeout_seconds)
    key = (
        settings.signing_key_file.read_bytes().strip()
        if settings.signing_key_file
        else secrets.token_bytes(32)
    )
    access = AccessCache(
        kube.may, settings.access_allowed_ttl_seconds, settings.access_denied_ttl_seconds
    )
    jobs = JobCache(kube, settings.cache_token_file) if settings.cache_token_file else None
    return Server(
        settings, kube, FileStore(settings.files_dir), UrlSigner(key),
        RateLimiter(settings.rate_limit_per_second), access, jobs,
    )  # fmt: skip


def create_app(settings: ServerSettings, kube: Kube | None = None) -> FastAPI:
    server = new_server(settings, kube)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if server.jobs is not None:
            server.jobs.start()
        yield
        if server.jobs is not None:
            await server.jobs.stop()
        await server.kube.close()

    app = FastAPI(title="kubetune-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(
        BodyLimit,
        upload_limit=settings.max_file_bytes + MULTIPART_OVERHEAD,
        other_limit=settings.max_json_bytes,
    )
    app.add_middleware(AccessLog)  # the outermost: every answer is logged, a 413 too

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        error = bad_request(f"{param or 'request'}: {first.get('msg', 'invalid')}", param)
        return JSONResponse(error.body(), status_code=400)

    app.include_router(files_api.router)
    app.include_router(jobs_api.router)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if settings.console:
        _mount_console(app, server)
    return app


def _mount_console(app: FastAPI, server: Server) -> None:
    settings = server.settings

    async def keep_dataset(namespace: str, upload: FormFile) -> str:
        """The console form's dataset file: checked and kept as an API upload is; the signed URL
        its job downloads it through."""
        stored = await run_in_threadpool(files_api.store_upload, server, namespace, upload)
        return server.signer.url(
            settings.dataset_base_url, namespace, stored.id, settings.dataset_url_seconds
        )

    app.state.console = console.new_console(
        server.kube,
        keep_dataset=keep_dataset,
        job_template=settings.job_template,
        allow=server.limiter.allow,
        token_header=settings.console_token_header,
        default_namespace=settings.default_namespace,
        namespaces=tuple(settings.console_namespaces),
    )
    app.include_router(console.make_router())

    @app.get("/ui", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse("/ui/", 308)


__all__ = ["create_app", "new_server"]
