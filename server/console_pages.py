"""The console's pages of jobs: the jobs list (every namespace the caller may list, filtered by
namespace, phase and name, its rows polled live) and one job's page (progress, curves, estimate
vs actual, answers, adapter, conditions and Events, the trainer's log tail, the YAML), each read
with the caller's own token."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kubetune.api.contract import TRAINER_CONTAINER
from kubetune.api.uris import display_uri
from kubetune.server import console_form
from kubetune.server.console_core import (
    LOG_LINES,
    Console,
    Viewer,
    as_viewer,
    html_response,
    page,
    state_of,
)
from kubetune.server.console_html import PHASES, Html, join, tag
from kubetune.server.console_job_html import job_live, job_yaml, jobs_rows
from kubetune.server.errors import ApiError

router = APIRouter()


async def listed_jobs(
    request: Request, viewer: Viewer
) -> tuple[list[str], list[dict[str, Any]], str | None]:
    query = request.query_params
    wanted = query.get("namespace") or None
    refused = None
    console = state_of(request)
    everything = await console.all_jobs(viewer)
    if everything is not None:
        # One request for whoever may list FineTuneJobs cluster-wide (no review per
        # namespace on every poll).
        namespaces = sorted({str(j["metadata"]["namespace"]) for j in everything})
        jobs = [j for j in everything if not wanted or j["metadata"]["namespace"] == wanted]
    else:
        namespaces = await console.namespaces_of(viewer, wanted)
        chosen = [wanted] if wanted else namespaces
        if wanted and wanted not in namespaces:
            chosen, refused = [], wanted
        found = await asyncio.gather(*(console.kube.list_jobs(viewer.token, n) for n in chosen))
        jobs = [job for batch in found for job in batch]
    phase = query.get("phase")
    if phase:
        jobs = [j for j in jobs if ((j.get("status") or {}).get("phase") or "Pending") == phase]
    text = (query.get("q") or "").strip().lower()
    if text:
        jobs = [j for j in jobs if text in j["metadata"]["name"]]
    jobs.sort(key=lambda j: str(j["metadata"].get("creationTimestamp") or ""), reverse=True)
    return namespaces, jobs, refused


def filters(request: Request, namespaces: list[str]) -> Html:
    query = request.query_params

    def options(values: list[str], chosen: str | None, everything: str) -> Html:
        return join(
            [tag('<option value="">{e}</option>', e=everything)]
            + [
                tag('<option value="{v}"{s}>{v}</option>', v=v,
                    s=Html(" selected") if v == chosen else Html(""))
                for v in values
            ]
        )  # fmt: skip

    return tag(
        '<form method="get" action="/ui/" class="filters" role="search">'
        '<label for="flt-namespace">Namespace</label>'
        '<select id="flt-namespace" name="namespace">{ns}</select>'
        '<label for="flt-phase">Phase</label><select id="flt-phase" name="phase">{ph}</select>'
        '<label for="flt-q">Name contains</label>'
        '<input id="flt-q" name="q" value="{q}" type="search">'
        '<button type="submit">Filter</button></form>',
        ns=options(namespaces, query.get("namespace"), "all you may list"),
        ph=options(list(PHASES), query.get("phase"), "any"),
        q=query.get("q") or "",
    )


@router.get("/")
async def jobs_page(request: Request) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        namespaces, jobs, refused = await listed_jobs(request, viewer)
        notice = Html("")
        if refused:
            notice = tag(
                '<p class="error" role="alert">You may not list FineTuneJobs in namespace '
                "{ns}.</p>",
                ns=refused,
            )
        elif not namespaces:
            notice = Html(
                '<p class="error" role="alert">You may not list FineTuneJobs in any '
                "namespace the console knows of: pick one with ?namespace=NAME.</p>"
            )
        query = request.url.query
        body = tag(
            '{filters}{notice}<p class="muted" id="namespaces">Namespaces: {ns}</p>'
            '<table class="jobs" id="jobs"><caption class="sr">FineTuneJobs, newest first, '
            'updated live</caption><thead><tr><th scope="col">Name</th>'
            '<th scope="col">Namespace</th><th scope="col">Phase</th>'
            '<th scope="col">Progress</th><th scope="col">Loss</th><th scope="col">ETA</th>'
            '<th scope="col">Estimate</th><th scope="col">Queue</th><th scope="col">Age</th>'
            '</tr></thead><tbody id="job-rows" data-poll="{poll}" aria-live="polite">{rows}'
            "</tbody></table>",
            filters=filters(request, namespaces),
            notice=notice,
            ns=", ".join(namespaces) or "none",
            poll="/ui/fragments/jobs" + (f"?{query}" if query else ""),
            rows=jobs_rows(jobs),
        )
        return html_response(page("Fine-tuning jobs", body, csrf=viewer.csrf))

    return await as_viewer(request, handle)


@router.get("/fragments/jobs")
async def jobs_fragment(request: Request) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        _, jobs, _ = await listed_jobs(request, viewer)
        return html_response(jobs_rows(jobs))

    return await as_viewer(request, handle)


# --- one job ------------------------------------------------------------------------------


async def job_and_events(
    console: Console, viewer: Viewer, namespace: str, name: str
) -> tuple[dict[str, Any], list[Any]]:
    if not console_form.NAME.match(namespace) or not console_form.NAME.match(name):
        raise ApiError(404, "no such FineTuneJob")
    job: dict[str, Any] = await console.kube.get_job(viewer.token, namespace, name)
    try:
        events = await console.kube.list_job_events(viewer.token, namespace, name)
    except ApiError as exc:
        if exc.status != 403:
            raise
        events = []
    return job, events


async def log_tail(console: Console, viewer: Viewer, job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    pod = status.get("podName")
    if not pod:
        return "(no trainer pod yet)"
    try:
        return await console.kube.pod_log(
            viewer.token, job["metadata"]["namespace"], pod, TRAINER_CONTAINER, LOG_LINES
        )
    except ApiError as exc:
        if exc.status == 403:
            return "(you may not read this namespace's pod logs)"
        if exc.status in (400, 404):
            return f"(pod {pod}: no log yet, or the pod is gone)"
        raise


@router.get("/jobs/{namespace}/{name}")
async def job_page(request: Request, namespace: str, name: str) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        job, events = await job_and_events(state_of(request), viewer, namespace, name)
        spec = job.get("spec") or {}
        dataset = spec.get("dataset") or {}
        body = tag(
            '<p class="muted">{ns} · model <code>{model}</code> · dataset <code>{data}</code>'
            " ({format}{columns})</p>"
            '<div data-poll="/ui/fragments/job/{ns}/{name}" id="live-holder">{live}</div>'
            '<section aria-labelledby="h-log"><h2 id="h-log">Trainer log (last {n} lines)'
            '</h2><pre class="log" id="log" tabindex="0">{log}</pre></section>'
            '<section aria-labelledby="h-yaml"><h2 id="h-yaml">YAML</h2><details>'
            '<summary>kubectl get -o yaml</summary><pre id="yaml" tabindex="0">{yaml}</pre>'
            "</details></section>",
            ns=namespace,
            name=name,
            model=display_uri(str((spec.get("model") or {}).get("uri", ""))),
            data=display_uri(str(dataset.get("uri", ""))),
            format=dataset.get("format", "auto"),
            columns=join(
                tag(', {k} column <code class="column">{v}</code>', k=k, v=v)
                for k, v in sorted((dataset.get("columns") or {}).items())
            ),
            live=job_live(job, events),
            n=LOG_LINES,
            log=await log_tail(state_of(request), viewer, job),
            yaml=job_yaml(job),
        )
        return html_response(page(name, body, csrf=viewer.csrf))

    return await as_viewer(request, handle)


@router.get("/fragments/job/{namespace}/{name}")
async def job_fragment(request: Request, namespace: str, name: str) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        job, events = await job_and_events(state_of(request), viewer, namespace, name)
        return html_response(job_live(job, events))

    return await as_viewer(request, handle)


__all__ = ["router"]
