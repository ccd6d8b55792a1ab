"""The node agent's HTTPS endpoint on the kubelet port: the apiserver proxies
``kubectl logs`` here (GET /containerLogs/{namespace}/{pod}/{container}).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlparse

from kubetune.local.pod_worker import PodWorker

FindWorker = Callable[[str, str], PodWorker | None]


class _Handler(BaseHTTPRequestHandler):
    server: LogServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the apiserver polls these endpoints."""

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            return self._text(200, "ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._text(404, f"not found: {url.path}")
        _, namespace, pod, container = parts
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        worker = self.server.find_worker(namespace, pod)
        if worker is None:
            return self._text(404, f"pod {namespace}/{pod} is not on this node")
        previous = query.get("previous") == "true"
        path = worker.log_path(container, previous)
        if path is None:
            return self._text(
                400,
                f'container "{container}" in pod "{pod}" is waiting to start'
                if container in worker.containers
                else f'container "{container}" is not valid for pod "{pod}"',
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        follow = query.get("follow") == "true" and not previous
        with contextlib.suppress(BrokenPipeError, ConnectionResetError), path.open("rb") as handle:
            # One handle for the backlog and what follows, so no line falls in between.
            self.wfile.write(_tail(handle.read(), query.get("tailLines"), query.get("limitBytes")))
            if follow and query.get("limitBytes") is None:
                self._follow(handle, path, worker, container)

    def _follow(self, handle: BinaryIO, path: Path, worker: PodWorker, container: str) -> None:
        while True:
            chunk = handle.read(65536)
            if chunk:
                self.wfile.write(chunk)
                self.wfile.flush()
                continue
            if not worker.container_running(container) or worker.log_path(container) != path:
                return
            time.sleep(0.2)

    def _text(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _tail(data: bytes, tail_lines: str | None, limit_bytes: str | None) -> bytes:
    if tail_lines is not None:
        count = int(tail_lines)
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-count:]) if count > 0 else b""
    if limit_bytes is not None:
        data = data[: int(limit_bytes)]
    return data


class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, host: str, port: int, cert: Path, key: Path, find_worker: FindWorker
    ) -> None:
        super().__init__((host, port), _Handler)
        self.find_worker = find_worker
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="log-server", daemon=True).start()
