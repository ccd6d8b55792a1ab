"""An OCI registry on loopback: distribution's ``registry`` (built from the Go module
hack/registry pins, beside the ``oras`` CLI), for adapters pushed to ``oci://`` outputs.

``kubetune local up --registry`` runs one beside the cluster (``LocalCluster.start_registry``);
tests start their own (``LoopbackRegistry``), with a login (htpasswd) when they need one. Plain
http on 127.0.0.1: the operator's settings must name it (``KUBETUNE_PLAIN_HTTP_REGISTRIES``).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.local.binaries import registry_dir
from kubetune.local.ports import free_port


def registry_config(
    port: int, storage: Path, htpasswd: Path | None = None, address: str = "127.0.0.1"
) -> dict[str, Any]:
    """The registry's configuration (YAML; JSON is YAML): filesystem storage under
    ``storage``, plain http on ``address``:``port`` (loopback unless given), deletes allowed, a
    login when ``htpasswd`` (bcrypt entries) is given."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"{address}:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "kubetune-local", "path": str(htpasswd)}}
    return config


def answers(port: int, address: str = "127.0.0.1") -> bool:
    """The registry answers its API root (200, or 401 where it asks for a login)."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/v2/", timeout=2) as response:
            return int(response.status) == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except (urllib.error.URLError, OSError):
        return False


def wait_until_answering(
    port: int, timeout: float, exited: Any = None, address: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    where = f"{address}:{port}"
    while not answers(port, address):
        if exited is not None and exited():
            raise RuntimeError(f"the registry on {where} exited before it answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the registry on {where} did not answer in {timeout:.0f}s")
        time.sleep(0.1)


class LoopbackRegistry:
    """A registry process of its own under ``root`` (storage, config, log), on a free port,
    until ``close()``. ``host`` is what an ``oci://`` URI names."""

    def __init__(
        self,
        root: Path,
        htpasswd: Path | None = None,
        *,
        binary: Path | None = None,
        timeout: float = 60,
        address: str = "127.0.0.1",
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = address
        self.host = f"{address}:{self.port}"
        self.storage = root / "storage"
        config = root / "config.yml"
        config.write_text(json.dumps(registry_config(self.port, self.storage, htpasswd, address)))
        self.log = root / "registry.log"
        binary = binary or registry_dir() / "registry"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until_answering(
                self.port, timeout, lambda: self.process.poll() is not None, address
            )
        except RuntimeError:
            self.close()
            raise RuntimeError(f"{self.log.read_text()[-2000:]}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
