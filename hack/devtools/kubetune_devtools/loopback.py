"""An HTTP server on loopback (or another address of this host) for tests that stand in for a
remote service."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """``handler`` answering on ``host`` (127.0.0.1 unless given: e.g. the host's side of a real
    node's link) at a free ``port`` (``url``), from a daemon thread, until ``close()``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> None:
        self.server = ThreadingHTTPServer((host, 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
