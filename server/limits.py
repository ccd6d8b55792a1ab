"""Request limits: the body size each route may bring (413 while it streams in) and a token
bucket of requests per caller (429)."""

from __future__ import annotations

import hashlib

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.api.token_buckets import TokenBuckets
from kubetune.server.errors import ApiError

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
    """A token bucket per caller (keyed by a hash of their token: the token isn't kept); a rate of
    0 or less limits nothing."""

    def __init__(self, per_second: float) -> None:
        self.rate = per_second
        self.buckets = TokenBuckets(rate=per_second, burst=max(1.0, 2 * per_second))

    def allow(self, token: str) -> bool:
        if self.rate <= 0:
            return True
        return self.buckets.allow(hashlib.sha256(token.encode()).hexdigest())


__all__ = ["MULTIPART_OVERHEAD", "BodyLimit", "RateLimiter"]
