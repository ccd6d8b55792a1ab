"""OpenAI's ``/v1/files`` (upload checked as the Validating phase checks a dataset, list,
retrieve, content, delete; a job's results as ``file-result-*``) and the signed dataset
downloads trainer pods make."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as FormFile

from kubetune.api.datasets import DatasetInvalid, check_jsonl, openai_pair
from kubetune.server import mapping
from kubetune.server.context import Caller, CallerDep, Server, ServerDep, list_of
from kubetune.server.errors import ApiError, bad_request, not_found
from kubetune.server.files import NAMESPACE, StoredFile, clean_filename

router = APIRouter()


@router.post("/v1/files")
async def upload_file(
    server: ServerDep,
    who: CallerDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise bad_request("purpose must be 'fine-tune'", "purpose")
    limit = server.settings.max_file_bytes
    if file.size is not None and file.size > limit:
        raise ApiError(413, f"the file is over {limit} bytes", code="too_large", param="file")
    await server.require(who, "create")
    stored = await run_in_threadpool(store_upload, server, who.namespace, file)
    return stored.to_openai()


@router.get("/v1/files")
async def list_files(
    server: ServerDep,
    who: CallerDep,
    *,
    purpose: str | None = None,
    limit: Annotated[int, Query()] = 100,
    after: str | None = None,
    order: str = "desc",
) -> dict[str, Any]:
    await server.require(who, "list")
    found = server.files.list(who.namespace)
    if purpose:
        found = [f for f in found if f.purpose == purpose]
    if order == "asc":
        found.reverse()
    chosen, more = mapping.page(found, after, min(limit, 100), lambda f: f.id)
    return list_of([f.to_openai() for f in chosen], more)


async def _file(server: Server, who: Caller, file_id: str) -> StoredFile:
    await server.require(who, "get")
    found = server.files.get(who.namespace, file_id)
    if found is None:
        raise not_found("file", file_id, "file_id")
    return found


async def _result(server: Server, who: Caller, file_id: str) -> tuple[dict[str, Any], str]:
    """A job's result file, read through the job the caller may get."""
    job = await server.job(who, file_id.removeprefix(mapping.RESULT_FILE))
    csv = mapping.result_csv(job)
    if csv is None:
        raise not_found("file", file_id, "file_id")
    return job, csv


@router.get("/v1/files/{file_id}")
async def retrieve_file(server: ServerDep, who: CallerDep, file_id: str) -> dict[str, Any]:
    if file_id.startswith(mapping.RESULT_FILE):
        job, csv = await _result(server, who, file_id)
        return {
            "id": file_id, "object": "file", "bytes": len(csv.encode()),
            "created_at": mapping.unix((job.get("status") or {}).get("completionTime")) or 0,
            "filename": f"{job['metadata']['name']}-results.csv",
            "purpose": "fine-tune-results", "status": "processed", "status_details": None,
        }  # fmt: skip
    return (await _file(server, who, file_id)).to_openai()


@router.get("/v1/files/{file_id}/content")
async def file_content(server: ServerDep, who: CallerDep, file_id: str) -> Response:
    if file_id.startswith(mapping.RESULT_FILE):
        _, csv = await _result(server, who, file_id)
        return Response(csv, media_type="text/csv")
    found = await _file(server, who, file_id)
    path = server.files.content_path(who.namespace, found.id)
    if path is None:
        raise not_found("file", file_id, "file_id")
    return FileResponse(path, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(server: ServerDep, who: CallerDep, file_id: str) -> dict[str, Any]:
    await server.require(who, "delete")
    if not server.files.delete(who.namespace, file_id):
        raise not_found("file", file_id, "file_id")
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/datasets/{namespace}/{file_name}")
async def dataset_download(
    server: ServerDep, namespace: str, file_name: str, expires: int, signature: str
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


def _as_trainer_pairs(path: Path) -> Iterator[bytes]:
    """An uploaded OpenAI DPO file (checked at upload), line by line as the trainer's pairs."""
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                yield (json.dumps(openai_pair(json.loads(line))) + "\n").encode()


def store_upload(server: Server, namespace: str, upload: FormFile) -> StoredFile:
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


__all__ = ["router", "store_upload"]
