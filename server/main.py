"""``kubetune-server``: the OpenAI-compatible fine-tuning API in one process (uvicorn)."""

from __future__ import annotations

import logging

import uvicorn

from kubetune.server.app import create_app
from kubetune.server.coalesce import CoalescingHttpToolsProtocol
from kubetune.server.settings import ServerSettings


def main() -> None:
    settings = ServerSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # httpx logs each request's URL (namespaces, job names) at INFO: the app's own line is enough.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings)
    # uvicorn's access log would print query strings (signed dataset URLs): the app logs each
    # request by its route template instead.
    uvicorn.run(
        app, host=settings.host, port=settings.port, access_log=False, proxy_headers=False,
        loop="uvloop" if settings.fast_http else "asyncio",
        http=CoalescingHttpToolsProtocol if settings.fast_http else "h11",
        timeout_keep_alive=30, limit_concurrency=1000, log_level="info",
    )  # fmt: skip


if __name__ == "__main__":
    main()
