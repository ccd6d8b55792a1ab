"""The console's core: who the caller is (``Viewer``: the token from the auth proxy's header or
the console's HttpOnly cookie, and the CSRF token derived from it), the ``Console`` state every
page reads, the page shell with its security headers, and ``as_viewer``, which runs a page as the
caller and turns a refused token into the login page and any other refusal into an error page."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import UploadFile

from kubetune.server import console_form
from kubetune.server.console_html import Html, tag
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


async def as_viewer(request: Request, handler: Handler) -> Response:
    """``handler`` run as the caller: no or a refused credential → the login page (the cookie
    dropped), over the rate limit → 429, another refusal → an error page."""
    console = state_of(request)
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


def state_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def console_of(request: Request) -> Console:
    return state_of(request)


ConsoleDep = Annotated[Console, Depends(console_of)]
