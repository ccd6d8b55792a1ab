"""The console's way in and out: the login page (a bearer token checked against the API server,
then kept in the HttpOnly ``__Host-`` cookie), ``kubetune ui``'s one-time launch link, logging
out (a CSRF-checked post), and the console's own script and stylesheet."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from kubetune.server.console_core import (
    ASSETS,
    COOKIE,
    STATIC,
    ConsoleDep,
    Viewer,
    _safe_next,
    _same_origin,
    as_viewer,
    html_response,
    page,
    state_of,
)
from kubetune.server.console_html import Html, tag
from kubetune.server.errors import ApiError

router = APIRouter()
#: How long the console's cookie lives.
COOKIE_SECONDS = 8 * 3600


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


def signed_in(token: str, target: str) -> RedirectResponse:
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE, token, path="/", secure=True, httponly=True, samesite="strict",
        max_age=COOKIE_SECONDS,
    )  # fmt: skip
    return response


@router.get("/login")
async def login_form(next: str | None = None) -> Response:
    return login_page(_safe_next(next))


@router.post("/login")
async def login(request: Request, console: ConsoleDep) -> Response:
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
async def launch(code: str, console: ConsoleDep) -> Response:
    """``kubetune ui``'s way in: a one-time code (in the URL it opens) for the local server's
    session; used once, then gone."""
    token = console.launch_codes.pop(code, None)
    if token is None:
        return login_page("/ui/", "This launch link was used already: sign in.", 403)
    return signed_in(token, "/ui/")


@router.post("/logout")
async def logout(request: Request) -> Response:
    async def handle(request: Request, viewer: Viewer) -> Response:
        form = await request.form()
        state_of(request).check_form(request, viewer, str(form.get("csrf") or ""))
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    return await as_viewer(request, handle)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in ASSETS:
        return Response(status_code=404)
    return FileResponse(
        STATIC / name,
        media_type=ASSETS[name],
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


__all__ = ["router"]
