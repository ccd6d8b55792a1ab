"""OpenAI's ``/v1/fine_tuning/jobs`` (create, list, retrieve, cancel, pause, resume, events,
checkpoints) and ``/v1/models`` (the offered base models and the caller's finished adapters),
each a FineTuneJob or its status underneath. Reads come from the cache where the caller's
access review allows them; writes always go with the caller's token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from kubetune.api.datasets import SUPERVISED_FORMATS
from kubetune.api.timestamps import rfc3339
from kubetune.server import manifest, mapping
from kubetune.server.context import Caller, CallerDep, Server, ServerDep, json_body, list_of
from kubetune.server.errors import ApiError, bad_request, not_found

router = APIRouter()
JSON = "application/json"


def render(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    return mapping.openai_job(job, server.settings.job_template)


def _file_ids(body: dict[str, Any]) -> dict[str, str]:
    """The request's training (and validation) file ids, by parameter."""
    training_file = body.get("training_file")
    if not isinstance(training_file, str):
        raise bad_request("training_file is required", "training_file")
    validation_file = body.get("validation_file")
    if validation_file is not None and not isinstance(validation_file, str):
        raise bad_request("validation_file must be a file id", "validation_file")
    files = {"training_file": training_file}
    if validation_file:
        files["validation_file"] = validation_file
    return files


def _check_files(server: Server, who: Caller, files: dict[str, str], kind: str) -> None:
    """Each file one the caller's namespace holds, with records of the method's kind."""
    for param, file_id in files.items():
        stored = server.files.get(who.namespace, file_id)
        if stored is None:
            raise not_found("file", file_id, param)
        if (kind == "supervised") != (stored.format in SUPERVISED_FORMATS):
            wants = "supervised records" if kind == "supervised" else "preference pairs"
            raise bad_request(
                f"{param} {file_id} holds {stored.format} records; method {kind} trains on {wants}",
                param,
            )


@router.post("/v1/fine_tuning/jobs")
async def create_job(server: ServerDep, who: CallerDep, request: Request) -> dict[str, Any]:
    settings = server.settings
    body = await json_body(request)
    model = body.get("model")
    if not isinstance(model, str) or model not in settings.models:
        allowed = ", ".join(sorted(settings.models)) or "none"
        raise bad_request(f"model {model!r} is not offered here (offered: {allowed})", "model")
    files = _file_ids(body)
    kind = manifest.method_of(body)
    await server.require(who, "create")
    _check_files(server, who, files, kind)
    name = manifest.new_job_name()
    urls = {
        param: server.signer.url(
            settings.dataset_base_url, who.namespace, file_id, settings.dataset_url_seconds
        )
        for param, file_id in files.items()
    }
    made = manifest.job_manifest(
        name, who.namespace, body,
        model_uri=settings.models[model], dataset_uri=urls["training_file"],
        template=settings.job_template, output_uri=settings.output_uri.format(job=name),
        eval_uri=urls.get("validation_file"),
    )  # fmt: skip
    created = await server.kube.create_job(who.token, who.namespace, made)
    return render(server, server.wrote(created))


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(
    server: ServerDep,
    who: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> Response:
    jobs = await server.jobs_newest_first(who)
    chosen, more = mapping.page(jobs, after, limit, lambda j: str(j["metadata"]["name"]))
    # The hot reads answer JSON bytes, each job's encoded once per resourceVersion: a dict
    # return would be validated and re-encoded on every call.
    return Response(server.rendered.page_json(chosen, more), media_type=JSON)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(server: ServerDep, who: CallerDep, job_id: str) -> Response:
    return Response(server.rendered.job_json(await server.job(who, job_id)), media_type=JSON)


async def _suspend(
    server: Server, who: Caller, job_id: str, suspend: bool, cancel: bool = False
) -> dict[str, Any]:
    """Suspend or resume the job (a cancel also marks it cancelled) at the resourceVersion just
    read: a job changed in between is a 409, not a lost update."""
    job = await server.fresh_job(who, job_id)
    state = mapping.openai_status(job)
    if state in mapping.FINISHED:
        already = "already " if cancel else ""
        raise bad_request(f"the job is {already}{state}", code="job_finished")
    metadata: dict[str, Any] = {"resourceVersion": job["metadata"]["resourceVersion"]}
    if cancel:
        metadata["annotations"] = {mapping.CANCELLED: rfc3339()}
    patch = {"metadata": metadata, "spec": {"runPolicy": {"suspend": suspend}}}
    patched = await server.kube.patch_job(who.token, who.namespace, job_id, patch)
    return render(server, server.wrote(patched))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(server: ServerDep, who: CallerDep, job_id: str) -> dict[str, Any]:
    return await _suspend(server, who, job_id, True, cancel=True)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(server: ServerDep, who: CallerDep, job_id: str) -> dict[str, Any]:
    return await _suspend(server, who, job_id, True)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(server: ServerDep, who: CallerDep, job_id: str) -> dict[str, Any]:
    return await _suspend(server, who, job_id, False)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(
    server: ServerDep, who: CallerDep, job_id: str, after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> dict[str, Any]:  # fmt: skip
    job = await server.job(who, job_id)
    kube_events = await server.kube.list_job_events(who.token, who.namespace, job_id)
    events = mapping.job_events(job, kube_events)
    chosen, more = mapping.page(events, after, limit, lambda e: str(e["id"]))
    return list_of(chosen, more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(
    server: ServerDep, who: CallerDep, job_id: str, after: str | None = None,
    limit: Annotated[int, Query()] = 10,
) -> dict[str, Any]:  # fmt: skip
    checkpoints = mapping.job_checkpoints(await server.job(who, job_id))
    chosen, more = mapping.page(checkpoints, after, limit, lambda c: str(c["id"]))
    return list_of(chosen, more)


# --- models --------------------------------------------------------------------------------


def _base_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "kubetune"}


def _adapter_model(job: dict[str, Any]) -> dict[str, Any]:
    adapter = ((job.get("status") or {}).get("result") or {}).get("adapter") or {}
    return {
        "id": mapping.fine_tuned_model(job),
        "object": "model",
        "created": mapping.unix((job.get("status") or {}).get("completionTime")) or 0,
        "owned_by": job["metadata"].get("namespace", ""),
        "root": mapping.base_model_name(job),
        "adapter": {"uri": adapter.get("uri"), "sha256": adapter.get("sha256")},
    }


@router.get("/v1/models")
async def list_models(server: ServerDep, who: CallerDep) -> dict[str, Any]:
    models = [_base_model(name) for name in sorted(server.settings.models)]
    try:
        jobs = await server.jobs_newest_first(who)
    except ApiError as exc:
        if exc.status != 403:
            raise
        jobs = []  # a caller who can't list jobs sees the platform's base models only
    models += [_adapter_model(j) for j in jobs if mapping.openai_status(j) == "succeeded"]
    return {"object": "list", "data": models}


@router.get("/v1/models/{model:path}")
async def retrieve_model(server: ServerDep, who: CallerDep, model: str) -> dict[str, Any]:
    if model in server.settings.models:
        return _base_model(model)
    name = mapping.job_of_model(model)
    if name is None:
        raise not_found("model", model, "model")
    job = await server.job(who, name)
    if mapping.openai_status(job) != "succeeded" or mapping.fine_tuned_model(job) != model:
        raise not_found("model", model, "model")
    return _adapter_model(job)


__all__ = ["router"]
