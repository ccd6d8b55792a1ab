"""HTTP/1.1 spoken by hand over one kept-alive connection to the API server (``Wire``).

The operator's requests are small JSON exchanges with one server: a request's bytes out, the
status line, the headers and the body (by its length, or its chunks) back. ``http.client`` does
the same through ``email``'s header parser, which cost half as much CPU again as the whole
exchange (0.31 against 0.20 ms per request; docs/performance.md, "third round").
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
from typing import Final

from urllib3 import HTTPHeaderDict


class Answer:
    """An answer read whole: what ApiException.from_response reads of it."""

    __slots__ = ("data", "fields", "reason", "status")

    def __init__(
        self, status: int, reason: str, data: bytes, fields: list[tuple[str, str]]
    ) -> None:
        self.status, self.reason, self.data, self.fields = status, reason, data, fields

    @property
    def headers(self) -> HTTPHeaderDict:
        """The answer's headers (made only for an ApiException: an answer outside 2xx)."""
        return HTTPHeaderDict(self.fields)

    def getheaders(self) -> HTTPHeaderDict:
        return self.headers


#: The longest status or header line taken (as http.client's limit).
_LINE_LIMIT: Final = 65536
#: The most header lines taken in one answer (as http.client's limit).
_HEADERS_LIMIT: Final = 100
#: What may not appear in a request's target or a header's value: controls, a space in a target.
_UNSAFE_TARGET: Final = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Wire:
    """One kept-alive HTTP/1.1 connection to the API server, spoken by hand: a request's bytes
    out, the status line, the headers and the body (by its length, or its chunks) back. What
    ``http.client`` does besides (its header parsing through ``email``) cost as much CPU again
    as the whole exchange (docs/performance.md)."""

    __slots__ = ("_reader", "_sock", "host")

    def __init__(self, sock: socket.socket, host: str) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        #: The Host header's value.
        self.host = host

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def idle_and_open(self) -> bool:
        """Whether this kept-alive connection can take the next request: nothing to read on it
        between requests (readable then means the server closed it, or is closing it)."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def exchange(
        self, method: str, target: str, payload: bytes | None, headers: dict[str, str]
    ) -> tuple[Answer, bool]:
        """Send one request, read its whole answer: (the answer, whether the connection stays
        open for the next)."""
        if _UNSAFE_TARGET.search(target):
            raise ValueError(f"a request target with a control character or space: {target!r}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        for name, value in headers.items():
            if _UNSAFE_VALUE.search(value):
                raise ValueError(f"the header {name} has a control character")
            lines.append(f"{name}: {value}")
        if payload is not None:
            lines.append(f"Content-Length: {len(payload)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._sock.sendall(head + payload if payload is not None else head)
        return self._answer(method)

    def _line(self) -> bytes:
        line = self._reader.readline(_LINE_LIMIT + 1)
        if len(line) > _LINE_LIMIT:
            raise http.client.LineTooLong("header line")
        return line

    def _answer(self, method: str) -> tuple[Answer, bool]:
        while True:
            line = self._line()
            if not line:
                raise http.client.RemoteDisconnected(
                    "Remote end closed connection without response"
                )
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
                raise http.client.BadStatusLine(line.decode("latin-1", "replace"))
            status = int(code)
            fields = self._fields()
            if status != 100:  # a 100 Continue's answer follows it
                break
        found = {name.lower(): value for name, value in fields}
        connection = found.get("connection", "").lower()
        keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        elif "chunked" in found.get("transfer-encoding", "").lower():
            data = self._chunks()
        elif "content-length" in found:
            data = self._exactly(int(found["content-length"]))
        else:  # the body ends where the connection does
            data, keep = self._reader.read(), False
        return Answer(status, reason, data, fields), keep

    def _fields(self) -> list[tuple[str, str]]:
        fields: list[tuple[str, str]] = []
        while True:
            line = self._line()
            if line in (b"\r\n", b"\n"):
                return fields
            if not line:
                raise http.client.RemoteDisconnected("Remote end closed connection in the headers")
            if len(fields) >= _HEADERS_LIMIT:
                raise http.client.HTTPException(f"got more than {_HEADERS_LIMIT} headers")
            name, _, value = line.decode("latin-1").partition(":")
            fields.append((name.strip(), value.strip()))

    def _exactly(self, size: int) -> bytes:
        data = self._reader.read(size)
        if len(data) < size:
            raise http.client.IncompleteRead(data, size - len(data))
        return data

    def _chunks(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self._line().split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._exactly(2)  # the chunk's CRLF
