"""The HTTP API: OpenAI's fine-tuning routes under ``/v1`` (files, fine_tuning/jobs, models),
the signed dataset downloads trainer pods make, and the web console under ``/ui`` (console.py).
Every Kubernetes request is the caller's (``kube.Kube`` with their bearer token); the server adds
no right of its own."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as FormFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.api.datasets import SUPERVISED_FORMATS, DatasetInvalid, check_jsonl, openai_pair
from kubetune.server import console, mapping
from kubetune.server.errors import ApiError, bad_request, not_found, unauthorized
from kubetune.server.files import NAMESPACE, FileStore, StoredFile, UrlSigner, clean_filename
from kubetune.server.kube import Kube, endpoint_from_kubeconfig, endpoint_in_cluster
from kubetune.server.settings import ServerSettings

log = logging.getLogger("kubetune.server")
#: Multipart framing and the purpose field (the console's form fields), on top of the file.
MULTIPART_OVERHEAD = 64 * 1024
#: Where a request body may bring a whole dataset: the API's upload and the console's form.
UPLOAD_PATHS = frozenset({"/v1/files", "/ui/new"})


class BodyLimit:
    """Refuse a request body over its limit while it streams in (413), whatever Content-Length
    says: uploads may bring ``max_file_bytes``, anything else ``max_json_bytes``."""

    def __init__(self, app: ASGIApp, upload_limit: int, other_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.other_limit = other_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        uploads = scope["path"] in UPLOAD_PATHS
        limit = self.upload_limit if uploads else self.other_limit
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _too_large(send, limit)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    error = ApiError(413, f"the request body is over {limit} bytes", code="too_large")
    await JSONResponse(error.body(), status_code=413)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class RateLimiter:
    """A token bucket per caller (keyed by a hash of their token: the token isn't kept)."""

    def __init__(self, per_second: float) -> None:
        self.rate = per_second
        self.burst = max(1.0, 2 * per_second)
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, token: str) -> bool:
        if self.rate <= 0:
            return True
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        level, at = self.buckets.get(key, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.rate)
        if len(self.buckets) > 10_000:
            self.buckets.clear()
        if level < 1:
            self.buckets[key] = (level, now)
            return False
        self.buckets[key] = (level - 1, now)
        return True


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


def caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    openai_project: Annotated[str | None, Header()] = None,
) -> Caller:
    """Who asks, and in which namespace: the bearer token (their Kubernetes credential, kept for
    this request only) and the OpenAI-Project header, else the configured default."""
    server: Server = request.app.state.server
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


CallerDep = Annotated[Caller, Depends(caller)]


def create_app(settings: ServerSettings, kube: Kube | None = None) -> FastAPI:
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
    server = Server(
        settings, kube, FileStore(settings.files_dir), UrlSigner(key),
        RateLimiter(settings.rate_limit_per_second),
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await server.kube.close()

    app = FastAPI(title="kubetune-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(
        BodyLimit,
        upload_limit=settings.max_file_bytes + MULTIPART_OVERHEAD,
        other_limit=settings.max_json_bytes,
    )

    @app.middleware("http")
    async def access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.monotonic()
        response = await call_next(request)
        route = request.scope.get("route")
        # The route's template only: no namespace, id, query string (signatures) or header.
        log.info(
            "%s %s %d %.1fms", request.method, getattr(route, "path", "?"),
            response.status_code, 1000 * (time.monotonic() - started),
        )  # fmt: skip
        return response

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

    async def require(who: Caller, verb: str) -> None:
        if not await server.kube.may(who.token, who.namespace, verb):
            raise ApiError(
                403, f"forbidden: the caller may not {verb} fine-tuning jobs in this project",
                code="forbidden",
            )  # fmt: skip

    # --- files ---------------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload_file(
        who: CallerDep,
        file: Annotated[UploadFile, File()],
        purpose: Annotated[str, Form()],
    ) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise bad_request("purpose must be 'fine-tune'", "purpose")
        limit = settings.max_file_bytes
        if file.size is not None and file.size > limit:
            raise ApiError(413, f"the file is over {limit} bytes", code="too_large", param="file")
        await require(who, "create")
        stored = await run_in_threadpool(_store_upload, server, who.namespace, file)
        return stored.to_openai()

    @app.get("/v1/files")
    async def list_files(
        who: CallerDep,
        purpose: str | None = None,
        limit: Annotated[int, Query()] = 100,
        after: str | None = None,
        order: str = "desc",
    ) -> dict[str, Any]:
        await require(who, "list")
        found = server.files.list(who.namespace)
        if purpose:
            found = [f for f in found if f.purpose == purpose]
        if order == "asc":
            found.reverse()
        chosen, more = mapping.page(found, after, min(limit, 100), lambda f: f.id)
        return _list_of([f.to_openai() for f in chosen], more)

    async def _file(who: Caller, file_id: str) -> StoredFile:
        await require(who, "get")
        found = server.files.get(who.namespace, file_id)
        if found is None:
            raise not_found("file", file_id, "file_id")
        return found

    async def _result(who: Caller, file_id: str) -> tuple[dict[str, Any], str]:
        """A job's result file, read through the job with the caller's token."""
        job = await _job(who, file_id.removeprefix(mapping.RESULT_FILE))
        csv = mapping.result_csv(job)
        if csv is None:
            raise not_found("file", file_id, "file_id")
        return job, csv

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(who: CallerDep, file_id: str) -> dict[str, Any]:
        if file_id.startswith(mapping.RESULT_FILE):
            job, csv = await _result(who, file_id)
            return {
                "id": file_id, "object": "file", "bytes": len(csv.encode()),
                "created_at": mapping.unix((job.get("status") or {}).get("completionTime")) or 0,
                "filename": f"{job['metadata']['name']}-results.csv",
                "purpose": "fine-tune-results", "status": "processed", "status_details": None,
            }  # fmt: skip
        return (await _file(who, file_id)).to_openai()

    @app.get("/v1/files/{file_id}/content")
    async def file_content(who: CallerDep, file_id: str) -> Response:
        if file_id.startswith(mapping.RESULT_FILE):
            _, csv = await _result(who, file_id)
            return Response(csv, media_type="text/csv")
        found = await _file(who, file_id)
        path = server.files.content_path(who.namespace, found.id)
        if path is None:
            raise not_found("file", file_id, "file_id")
        return FileResponse(path, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(who: CallerDep, file_id: str) -> dict[str, Any]:
        await require(who, "delete")
        if not server.files.delete(who.namespace, file_id):
            raise not_found("file", file_id, "file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/datasets/{namespace}/{file_name}")
    async def dataset_download(
        namespace: str, file_name: str, expires: int, signature: str
    ) -> Response:
        """What a trainer pod downloads: no bearer token, a signature over namespace, file and
        expiry instead (the URL the job's spec.dataset.uri holds)."""
        file_id = file_name.removesuffix(".jsonl")
        if not NAMESPACE.match(namespace) or not server.signer.valid(
            namespace, file_id, expires, signature
        ):
            raise ApiError(403, "the URL's signature is invalid or expired", code="forbidden")
        path = server.files.content_path(namespace, file_id)
        stored = server.files.get(namespace, file_id)
        if path is None or stored is None:
            raise not_found("file", file_id)
        if stored.format == "openai-preference":
            # OpenAI's DPO records, as the trainer's chat preference pairs.
            return StreamingResponse(_as_trainer_pairs(path), media_type="application/jsonl")
        return FileResponse(path, media_type="application/jsonl")

    # --- fine-tuning jobs ----------------------------------------------------------------

    def render(job: dict[str, Any]) -> dict[str, Any]:
        return mapping.openai_job(job, settings.job_template)

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(who: CallerDep, request: Request) -> dict[str, Any]:
        body = await _json(request)
        model = body.get("model")
        if not isinstance(model, str) or model not in settings.models:
            allowed = ", ".join(sorted(settings.models)) or "none"
            raise bad_request(f"model {model!r} is not offered here (offered: {allowed})", "model")
        training_file = body.get("training_file")
        if not isinstance(training_file, str):
            raise bad_request("training_file is required", "training_file")
        validation_file = body.get("validation_file")
        if validation_file is not None and not isinstance(validation_file, str):
            raise bad_request("validation_file must be a file id", "validation_file")
        kind = mapping.method_of(body)
        await require(who, "create")
        files = {"training_file": training_file}
        if validation_file:
            files["validation_file"] = validation_file
        for param, file_id in files.items():
            stored = server.files.get(who.namespace, file_id)
            if stored is None:
                raise not_found("file", file_id, param)
            if (kind == "supervised") != (stored.format in SUPERVISED_FORMATS):
                wants = "supervised records" if kind == "supervised" else "preference pairs"
                raise bad_request(
                    f"{param} {file_id} holds {stored.format} records; method {kind} trains on "
                    f"{wants}",
                    param,
                )
        name = mapping.new_job_name()
        urls = {
            param: server.signer.url(
                settings.dataset_base_url, who.namespace, file_id, settings.dataset_url_seconds
            )
            for param, file_id in files.items()
        }
        manifest = mapping.job_manifest(
            name, who.namespace, body,
            model_uri=settings.models[model], dataset_uri=urls["training_file"],
            template=settings.job_template, output_uri=settings.output_uri.format(job=name),
            eval_uri=urls.get("validation_file"),
        )  # fmt: skip
        created = await server.kube.create_job(who.token, who.namespace, manifest)
        return render(created)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(
        who: CallerDep, after: str | None = None, limit: Annotated[int, Query()] = 20
    ) -> dict[str, Any]:
        jobs = await server.kube.list_jobs(who.token, who.namespace)
        jobs.sort(key=mapping.job_sort_key, reverse=True)
        chosen, more = mapping.page(jobs, after, limit, lambda j: str(j["metadata"]["name"]))
        return _list_of([render(j) for j in chosen], more)

    async def _job(who: Caller, job_id: str) -> dict[str, Any]:
        if not mapping.JOB_ID.match(job_id):
            raise not_found("fine-tuning job", job_id)
        try:
            job: dict[str, Any] = await server.kube.get_job(who.token, who.namespace, job_id)
        except ApiError as exc:
            if exc.status == 404:
                raise not_found("fine-tuning job", job_id) from None
            raise
        return job

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(who: CallerDep, job_id: str) -> dict[str, Any]:
        return render(await _job(who, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(who: CallerDep, job_id: str) -> dict[str, Any]:
        job = await _job(who, job_id)
        state = mapping.openai_status(job)
        if state in mapping.FINISHED:
            raise bad_request(f"the job is already {state}", code="job_finished")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {
            "metadata": {
                "annotations": {mapping.CANCELLED: now},
                "resourceVersion": job["metadata"]["resourceVersion"],
            },
            "spec": {"runPolicy": {"suspend": True}},
        }
        return render(await server.kube.patch_job(who.token, who.namespace, job_id, patch))

    async def _suspend(who: Caller, job_id: str, suspend: bool) -> dict[str, Any]:
        job = await _job(who, job_id)
        state = mapping.openai_status(job)
        if state in mapping.FINISHED:
            raise bad_request(f"the job is {state}", code="job_finished")
        patch = {
            "metadata": {"resourceVersion": job["metadata"]["resourceVersion"]},
            "spec": {"runPolicy": {"suspend": suspend}},
        }
        return render(await server.kube.patch_job(who.token, who.namespace, job_id, patch))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(who: CallerDep, job_id: str) -> dict[str, Any]:
        return await _suspend(who, job_id, True)

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(who: CallerDep, job_id: str) -> dict[str, Any]:
        return await _suspend(who, job_id, False)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(
        who: CallerDep, job_id: str, after: str | None = None,
        limit: Annotated[int, Query()] = 20,
    ) -> dict[str, Any]:  # fmt: skip
        job = await _job(who, job_id)
        kube_events = await server.kube.list_job_events(who.token, who.namespace, job_id)
        events = mapping.job_events(job, kube_events)
        chosen, more = mapping.page(events, after, limit, lambda e: str(e["id"]))
        return _list_of(chosen, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(
        who: CallerDep, job_id: str, after: str | None = None,
        limit: Annotated[int, Query()] = 10,
    ) -> dict[str, Any]:  # fmt: skip
        checkpoints = mapping.job_checkpoints(await _job(who, job_id))
        chosen, more = mapping.page(checkpoints, after, limit, lambda c: str(c["id"]))
        return _list_of(chosen, more)

    # --- models --------------------------------------------------------------------------

    def base_model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "kubetune"}

    def adapter_model(job: dict[str, Any]) -> dict[str, Any]:
        adapter = ((job.get("status") or {}).get("result") or {}).get("adapter") or {}
        return {
            "id": mapping.fine_tuned_model(job),
            "object": "model",
            "created": mapping.unix((job.get("status") or {}).get("completionTime")) or 0,
            "owned_by": job["metadata"].get("namespace", ""),
            "root": mapping.base_model_name(job),
            "adapter": {"uri": adapter.get("uri"), "sha256": adapter.get("sha256")},
        }

    @app.get("/v1/models")
    async def list_models(who: CallerDep) -> dict[str, Any]:
        models = [base_model(name) for name in sorted(settings.models)]
        try:
            jobs = await server.kube.list_jobs(who.token, who.namespace)
        except ApiError as exc:
            if exc.status != 403:
                raise
            jobs = []  # a caller who can't list jobs sees the platform's base models only
        jobs.sort(key=mapping.job_sort_key, reverse=True)
        models += [adapter_model(j) for j in jobs if mapping.openai_status(j) == "succeeded"]
        return {"object": "list", "data": models}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(who: CallerDep, model: str) -> dict[str, Any]:
        if model in settings.models:
            return base_model(model)
        name = mapping.job_of_model(model)
        if name is None:
            raise not_found("model", model, "model")
        job = await _job(who, name)
        if mapping.openai_status(job) != "succeeded" or mapping.fine_tuned_model(job) != model:
            raise not_found("model", model, "model")
        return adapter_model(job)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if settings.console:

        async def keep_dataset(namespace: str, upload: FormFile) -> str:
            """The console form's dataset file: checked and kept as an API upload is; the
            signed URL its job downloads it through."""
            stored = await run_in_threadpool(_store_upload, server, namespace, upload)
            return server.signer.url(
                settings.dataset_base_url, namespace, stored.id, settings.dataset_url_seconds
            )

        app.state.console = console.new_console(
            kube,
            keep_dataset=keep_dataset,
            job_template=settings.job_template,
            allow=server.limiter.allow,
            token_header=settings.console_token_header,
            default_namespace=settings.default_namespace,
            namespaces=tuple(settings.console_namespaces),
        )
        app.include_router(console.make_router(app.state.console))

        @app.get("/ui", include_in_schema=False)
        async def console_root() -> RedirectResponse:
            return RedirectResponse("/ui/", 308)

    return app


def _list_of(data: list[Any], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _as_trainer_pairs(path: Path) -> Iterator[bytes]:
    """An uploaded OpenAI DPO file (checked at upload), line by line as the trainer's pairs."""
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                yield (json.dumps(openai_pair(json.loads(line))) + "\n").encode()


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _store_upload(server: Server, namespace: str, upload: FormFile) -> StoredFile:
    """Copy the upload into the namespace's folder, check it as the Validating phase checks a
    dataset (400 naming the first bad line), and keep it."""
    limit = server.settings.max_file_bytes
    temporary = server.files.temporary(namespace)
    try:
        size = 0
        with temporary.open("wb") as out:
            while chunk := upload.file.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the file is over {limit} bytes", code="too_large")
                out.write(chunk)
        try:
            with temporary.open("rb") as lines:
                summary = check_jsonl(lines)
        except DatasetInvalid as exc:
            raise ApiError(400, f"invalid training file: {exc}", "invalid_file", "file") from None
        stored = StoredFile(
            id=server.files.new_id(), bytes=size, created_at=int(time.time()),
            filename=clean_filename(upload.filename), purpose="fine-tune",
            format=summary.format, examples=summary.examples,
        )  # fmt: skip
        server.files.keep(namespace, temporary, stored)
        return stored
    finally:
        temporary.unlink(missing_ok=True)
