"""The console's new-job form: the page (namespaces the caller may create jobs in, the
platform's job template as defaults), its preview, and the post — CSRF-checked, the dataset
file kept as an API upload is, the spec checked as ``kubetune validate`` checks it, errors by
field — that creates the FineTuneJob with the caller's token."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import UploadFile

from kubetune.server import console_form
from kubetune.server.console_core import Console, Viewer, as_viewer, html_response, page, state_of
from kubetune.server.console_form import NAME
from kubetune.server.console_html import Html, join, tag
from kubetune.server.errors import ApiError

router = APIRouter()


async def form_page(
    viewer: Viewer, values: dict[str, str], namespace: str, problems: list[str],
    preview: str | None, *, console: Console, status: int = 200,
) -> Response:  # fmt: skip
    namespaces = await console.namespaces_of(viewer, namespace or None)
    writable = await asyncio.gather(
        *(console.kube.may(viewer.token, n, "create") for n in namespaces)
    )
    choices = [n for n, ok in zip(namespaces, writable, strict=True) if ok]
    shown = tag(
        '<section aria-labelledby="h-preview"><h2 id="h-preview">The YAML it applies</h2>'
        '<pre id="preview" tabindex="0">{yaml}</pre></section>',
        yaml=preview,
    ) if preview else Html("")  # fmt: skip
    body = join(
        [
            console_form.render_form(
                values,
                choices,
                namespace,
                problems,
                csrf=viewer.csrf,
                template=console.job_template,
            ),
            shown,
        ]
    )
    return html_response(page("New fine-tuning job", body, csrf=viewer.csrf), status)


@router.get("/new")
async def new_job(request: Request) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        return await form_page(
            viewer,
            {},
            request.query_params.get("namespace", ""),
            [],
            None,
            console=state_of(request),
        )

    return await as_viewer(request, handle)


@router.post("/new")
async def submit_job(request: Request) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        console = state_of(request)
        form = await request.form()
        console.check_form(request, viewer, str(form.get("csrf") or ""))
        values = {key: str(value) for key, value in form.items() if isinstance(value, str)}
        namespace = values.get("metadata.namespace", "")
        upload = form.get("datasetFile")
        if isinstance(upload, UploadFile) and upload.filename and NAME.match(namespace):
            # Kept before the rest is checked: the form comes back with its URI filled in,
            # so a refused spec doesn't ask for the file again.
            if not await console.kube.may(viewer.token, namespace, "create"):
                raise ApiError(403, "forbidden: you may not create FineTuneJobs there")
            try:
                values["spec.dataset.uri"] = await console.keep_dataset(namespace, upload)
            except ApiError as exc:
                if exc.status not in (400, 413):
                    raise
                problems = [f"datasetFile: {exc.message}"]
                return await form_page(
                    viewer, values, namespace, problems, None, status=400, console=console
                )
        manifest = console_form.manifest_of(values, namespace, console.job_template)
        problems = console_form.problems_of(manifest)
        if not NAME.match(namespace):
            problems.insert(0, "metadata.namespace: pick a namespace")
        text = console_form.manifest_yaml(manifest)
        if problems:
            return await form_page(
                viewer, values, namespace, problems, None, status=400, console=console
            )
        if form.get("action") != "create":
            return await form_page(viewer, values, namespace, [], text, console=console)
        try:
            await console.kube.create_job(viewer.token, namespace, manifest)
        except ApiError as exc:
            if exc.status in (400, 403, 409):
                return await form_page(
                    viewer,
                    values,
                    namespace,
                    [exc.message],
                    text,
                    status=400,
                    console=state_of(request),
                )
            raise
        name = manifest["metadata"]["name"]
        return RedirectResponse(f"/ui/jobs/{namespace}/{name}", 303)

    return await as_viewer(request, handle)


__all__ = ["router"]
