"""The web console under ``/ui``: the jobs list, a job's page and the new-job form, rendered on
the server, with the caller's own Kubernetes identity exactly as the API has it.

Who the caller is: the token they pasted on the login page, kept in a cookie the page's scripts
can't read (HttpOnly, Secure, SameSite=Strict, ``__Host-``), or the header an auth proxy in front
sets (``consoleTokenHeader``). Every request to the API server carries that token; the console
adds no right of its own. Forms carry a CSRF token derived from the caller's token, and every
page is sent with a Content-Security-Policy that allows the server's own script and style only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.datastructures import UploadFile

from kubetune.api.contract import TRAINER_CONTAINER
from kubetune.api.uris import display_uri
from kubetune.server import console_form
from kubetune.server.console_form import NAME
from kubetune.server.console_html import (
    FINAL_PHASES,
    PHASES,
    Html,
    esc,
    job_live,
    job_yaml,
    jobs_rows,
    join,
    tag,
)
from kubetune.server.errors import ApiError
from kubetune.server.kube import Kube

COOKIE = "__Host-kubetune-console"
STATIC = Path(__file__).with_name("static")
ASSETS = {"console.css": "text/css", "console.js": "text/javascript"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
LOG_LINES = 200
#: A ServiceAccount's user name: its namespace is where its tenant rights usually are.
SA_PREFIX = "system:serviceaccount:"


KeepDataset = Callable[[str, UploadFile], Awaitable[str]]


class LoginNeeded(Exception):
    """No credential, or one the API server refuses: off to the login page."""


@dataclass(frozen=True)
class Viewer:
    token: str
    csrf: str


@dataclass
class Console:
    kube: Kube
    key: bytes
    token_header: str | None
    default_namespace: str | None
    namespaces: tuple[str, ...]
    #: One-time codes ``kubetune ui`` opens the browser with (code → token).
    launch_codes: dict[str, str]
    #: Keeps a dataset file sent with the form in a namespace; the URI a job reads it from.
    keep_dataset: KeepDataset
    #: The spec every job made through the server starts from (``server.jobTemplate``).
    job_template: dict[str, Any]
    #: The server's rate limit per caller (the API's bucket: the console's requests count).
    allow: Callable[[str], bool]

    def csrf_for(self, token: str) -> str:
        return hmac.new(self.key, b"csrf:" + token.encode(), hashlib.sha256).hexdigest()

    def viewer(self, request: Request) -> Viewer:
        token = ""
        if self.token_header:
            token = request.headers.get(self.token_header, "").strip()
        token = token or request.cookies.get(COOKIE, "").strip()
        if not token:
            raise LoginNeeded
        return Viewer(token, self.csrf_for(token))

    def check_form(self, request: Request, viewer: Viewer, sent: str) -> None:
        """A form post must come from a page of this console: same origin, with its CSRF token."""
        if not _same_origin(request) or not hmac.compare_digest(sent, viewer.csrf):
            raise ApiError(403, "the form's CSRF token is missing or stale: reload the page")

    async def namespaces_of(self, viewer: Viewer, wanted: str | None) -> list[str]:
        """The namespaces whose FineTuneJobs the caller may list: all namespaces when they may
        list those, else the configured ones, the default, their ServiceAccount's and the one
        asked for, each checked with a SelfSubjectAccessReview."""
        try:
            candidates = set(await self.kube.list_namespaces(viewer.token))
        except ApiError as exc:
            if exc.status == 401:
                raise LoginNeeded from None
            if exc.status != 403:
                raise
            candidates = set(self.namespaces)
            if self.default_namespace:
                candidates.add(self.default_namespace)
            user = await self._username(viewer)
            if user.startswith(SA_PREFIX):
                candidates.add(user.removeprefix(SA_PREFIX).split(":")[0])
        if wanted and console_form.NAME.match(wanted):
            candidates.add(wanted)
        ordered = sorted(candidates)
        allowed = await asyncio.gather(
            *(self.kube.may(viewer.token, namespace, "list") for namespace in ordered)
        )
        return [n for n, ok in zip(ordered, allowed, strict=True) if ok]

    async def all_jobs(self, viewer: Viewer) -> list[dict[str, Any]] | None:
        """Every namespace's FineTuneJobs, or None when the caller may not list them
        cluster-wide."""
        try:
            return await self.kube.list_all_jobs(viewer.token)
        except ApiError as exc:
            if exc.status == 401:
                raise LoginNeeded from None
            if exc.status == 403:
                return None
            raise

    async def _username(self, viewer: Viewer) -> str:
        try:
            return await self.kube.username(viewer.token)
        except ApiError as exc:
            if exc.status == 401:
                raise LoginNeeded from None
            return ""


def _same_origin(request: Request) -> bool:
    """Whether a post comes from a page of this console: the browser's Sec-Fetch-Site says so,
    or (older browsers) its Origin names this host."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser: a cross-site form always carries one of the two headers
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


def page(title: str, body: Html, *, user_nav: bool = True, csrf: str = "") -> Html:
    nav = Html("")
    if user_nav:
        nav = tag(
            '<nav aria-label="Console"><a href="/ui/">Jobs</a> <a href="/ui/new">New job</a> '
            '<form method="post" action="/ui/logout" class="logout"><input type="hidden" '
            'name="csrf" value="{csrf}"><button type="submit">Log out</button></form></nav>',
            csrf=csrf,
        )
    return tag(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>{title} · kubetune</title>"
        '<link rel="stylesheet" href="/ui/static/console.css">'
        '<script src="/ui/static/console.js" defer></script></head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        '<header><span class="brand">kubetune</span>{nav}</header>'
        '<main id="main" tabindex="-1"><h1>{title}</h1>{body}</main></body></html>',
        title=title,
        nav=nav,
        body=body,
    )


def html_response(content: Html, status: int = 200) -> HTMLResponse:
    return HTMLResponse(str(content), status_code=status, headers=SECURITY_HEADERS)


def error_page(viewer: Viewer | None, exc: ApiError) -> HTMLResponse:
    body = tag('<p class="error" role="alert">{message}</p>', message=exc.message)
    csrf = viewer.csrf if viewer else ""
    return html_response(page("Error", body, csrf=csrf), exc.status)


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(
        "/ui/login?" + urllib.parse.urlencode({"next": _safe_next(target)}), 303
    )
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


Handler = Callable[[Request, Viewer], Awaitable[Response]]


def make_router(console: Console) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)

    async def as_viewer(request: Request, handler: Handler) -> Response:
        try:
            viewer = console.viewer(request)
        except LoginNeeded:
            return _login_redirect(request)
        if not console.allow(viewer.token):
            return error_page(viewer, ApiError(429, "too many requests; slow down"))
        try:
            return await handler(request, viewer)
        except LoginNeeded:
            return _login_redirect(request)
        except ApiError as exc:
            if exc.status == 401:
                return _login_redirect(request)
            return error_page(viewer, exc)

    # --- logging in and out -------------------------------------------------------------------

    def login_page(next_url: str, message: str = "", status: int = 200) -> HTMLResponse:
        alert = tag('<p class="error" role="alert">{m}</p>', m=message) if message else Html("")
        body = tag(
            "{alert}<p>Sign in with a Kubernetes bearer token the cluster accepts (for example "
            "<code>kubectl create token NAME</code>, or your OIDC ID token). The console acts "
            "with it exactly as kubectl would; it stays in an HttpOnly cookie of this site.</p>"
            '<form method="post" action="/ui/login" class="login">'
            '<input type="hidden" name="next" value="{next}">'
            '<label for="token">Token</label>'
            '<input type="password" id="token" name="token" autocomplete="off" required autofocus>'
            '<button type="submit">Sign in</button></form>',
            alert=alert,
            next=next_url,
        )
        return html_response(page("Sign in", body, user_nav=False), status)

    @router.get("/login")
    async def login_form(next: str | None = None) -> Response:
        return login_page(_safe_next(next))

    def signed_in(token: str, target: str) -> RedirectResponse:
        response = RedirectResponse(target, 303)
        response.set_cookie(
            COOKIE, token, path="/", secure=True, httponly=True, samesite="strict", max_age=8 * 3600
        )
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        target = _safe_next(str(form.get("next") or ""))
        token = str(form.get("token") or "").strip()
        if not _same_origin(request):
            return login_page(target, "This sign-in did not come from the console's page.", 403)
        if not token:
            return login_page(target, "Paste a token.", 400)
        try:
            await console.kube.username(token)
        except ApiError as exc:
            if exc.status == 401:
                return login_page(target, "The API server does not accept this token.", 401)
            return login_page(target, exc.message, exc.status)
        return signed_in(token, target)

    @router.get("/launch/{code}")
    async def launch(code: str) -> Response:
        """``kubetune ui``'s way in: a one-time code (in the URL it opens) for the local
        server's session; used once, then gone."""
        token = console.launch_codes.pop(code, None)
        if token is None:
            return login_page("/ui/", "This launch link was used already: sign in.", 403)
        return signed_in(token, "/ui/")

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        async def handle(request: Request, viewer: Viewer) -> Response:
            form = await request.form()
            console.check_form(request, viewer, str(form.get("csrf") or ""))
            response = RedirectResponse("/ui/login", 303)
            response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
            return response

        return await as_viewer(request, handle)

    # --- assets -------------------------------------------------------------------------------

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return FileResponse(
            STATIC / name,
            media_type=ASSETS[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    # --- the jobs list ------------------------------------------------------------------------

    async def listed_jobs(
        request: Request, viewer: Viewer
    ) -> tuple[list[str], list[dict[str, Any]], str | None]:
        query = request.query_params
        wanted = query.get("namespace") or None
        refused = None
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
        viewer: Viewer, namespace: str, name: str
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

    async def log_tail(viewer: Viewer, job: dict[str, Any]) -> str:
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
            job, events = await job_and_events(viewer, namespace, name)
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
                log=await log_tail(viewer, job),
                yaml=job_yaml(job),
            )
            return html_response(page(name, body, csrf=viewer.csrf))

        return await as_viewer(request, handle)

    @router.get("/fragments/job/{namespace}/{name}")
    async def job_fragment(request: Request, namespace: str, name: str) -> Response:
        async def handle(request: Request, viewer: Viewer) -> Response:
            job, events = await job_and_events(viewer, namespace, name)
            return html_response(job_live(job, events))

        return await as_viewer(request, handle)

    # --- a new job ----------------------------------------------------------------------------

    async def form_page(
        viewer: Viewer, values: dict[str, str], namespace: str, problems: list[str],
        preview: str | None, *, status: int = 200,
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
            return await form_page(viewer, {}, request.query_params.get("namespace", ""), [], None)

        return await as_viewer(request, handle)

    @router.post("/new")
    async def submit_job(request: Request) -> Response:
        async def handle(request: Request, viewer: Viewer) -> Response:
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
                    return await form_page(viewer, values, namespace, problems, None, status=400)
            manifest = console_form.manifest_of(values, namespace, console.job_template)
            problems = console_form.problems_of(manifest)
            if not NAME.match(namespace):
                problems.insert(0, "metadata.namespace: pick a namespace")
            text = console_form.manifest_yaml(manifest)
            if problems:
                return await form_page(viewer, values, namespace, problems, None, status=400)
            if form.get("action") != "create":
                return await form_page(viewer, values, namespace, [], text)
            try:
                await console.kube.create_job(viewer.token, namespace, manifest)
            except ApiError as exc:
                if exc.status in (400, 403, 409):
                    return await form_page(
                        viewer, values, namespace, [exc.message], text, status=400
                    )
                raise
            name = manifest["metadata"]["name"]
            return RedirectResponse(f"/ui/jobs/{namespace}/{name}", 303)

        return await as_viewer(request, handle)

    return router


def new_console(
    kube: Kube,
    *,
    keep_dataset: KeepDataset,
    job_template: dict[str, Any],
    allow: Callable[[str], bool],
    token_header: str | None,
    default_namespace: str | None,
    namespaces: tuple[str, ...],
) -> Console:
    return Console(
        kube, secrets.token_bytes(32), token_header, default_namespace, namespaces, {},
        keep_dataset, job_template, allow,
    )  # fmt: skip


__all__ = ["COOKIE", "CSP", "FINAL_PHASES", "Console", "esc", "make_router", "new_console"]
