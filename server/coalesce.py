"""uvicorn's httptools protocol with a response's writes leaving in one send: uvicorn writes the
status line and headers, then the body, each straight to the socket, so a small JSON answer
cost two ``send`` calls (on loopback each also runs the receiver's TCP work). Here every write
made in one turn of the event loop is joined and sent once at its end — a sixth less of the
protocol's CPU a call, docs/performance.md; nothing else about the protocol changes."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """The connection's transport, with ``write`` deferred to the end of the loop's turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(bytes(data))

    def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()  # what was written goes before the connection closes
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


__all__ = ["CoalescingHttpToolsProtocol", "CoalescingTransport"]
