"""The web console under ``/ui``: the jobs list, a job's page and the new-job form, rendered on
the server, with the caller's own Kubernetes identity exactly as the API has it.

Who the caller is: the token they pasted on the login page, kept in a cookie the page's scripts
can't read (HttpOnly, Secure, SameSite=Strict, ``__Host-``), or the header an auth proxy in front
sets (``consoleTokenHeader``). Every request to the API server carries that token; the console
adds no right of its own. Forms carry a CSRF token derived from the caller's token, and every
page is sent with a Content-Security-Policy that allows the server's own script and style only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from kubetune.server import console_auth, console_new, console_pages
from kubetune.server.console_core import (
    COOKIE,
    CSP,
    Console,
    KeepDataset,
)
from kubetune.server.console_html import FINAL_PHASES, esc
from kubetune.server.kube import Kube


def make_router() -> APIRouter:
    """Every console route under ``/ui``; each reads the ``Console`` from ``app.state.console``."""
    router = APIRouter(prefix="/ui", include_in_schema=False)
    for part in (console_auth, console_pages, console_new):
        router.include_router(part.router)
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
