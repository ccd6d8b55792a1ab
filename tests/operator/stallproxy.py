"""A TCP proxy in front of the kube-apiserver whose open connections can be made to go quiet.

``stall()`` turns every connection open at that moment into a black hole: bytes either way are
read and dropped, nothing is closed — what a dropped NAT entry or a stuck middlebox does to a
long-lived watch. Connections opened afterwards pass as before. TLS goes through untouched (the
client still talks to the apiserver's certificate, valid for 127.0.0.1 on any port).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from types import TracebackType

import yaml


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.stalled = False
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()


class StallingProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        #: Stalled connections that the client closed (it gave up on the silence).
        self.closed_by_client_while_stalled = 0
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> StallingProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def stall(self) -> int:
        """Silence every connection open now; how many there were."""
        with self._lock:
            open_now = [c for c in self._connections if not c.closed]
            for connection in open_now:
                connection.stalled = True
            return len(open_now)

    def drop(self) -> int:
        """Close every connection open now, as a server closes idle kept-alive ones; how many
        there were."""
        with self._lock:
            open_now = [c for c in self._connections if not c.closed]
            for connection in open_now:
                connection.close()
            return len(open_now)

    @property
    def opened(self) -> int:
        """Connections the proxy has taken so far."""
        with self._lock:
            return len(self._connections)

    def kubeconfig(self, source: Path, dest: Path) -> Path:
        """A copy of the kubeconfig ``source`` whose clusters are reached through this proxy."""
        config = yaml.safe_load(source.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        dest.write_text(yaml.safe_dump(config))
        return dest

    def close(self) -> None:
        self._running = False
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                connection.close()

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            connection = _Connection(client, upstream)
            with self._lock:
                self._connections.append(connection)
            for source, sink, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(connection, source, sink, from_client), daemon=True
                ).start()

    def _pump(
        self, connection: _Connection, source: socket.socket, sink: socket.socket, from_client: bool
    ) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                if from_client and connection.stalled and not connection.closed:
                    with self._lock:
                        self.closed_by_client_while_stalled += 1
                connection.close()
                return
            if connection.stalled:
                continue  # the black hole: read, never delivered
            try:
                sink.sendall(data)
            except OSError:
                connection.close()
                return
