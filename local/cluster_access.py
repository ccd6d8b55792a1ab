"""How the local cluster's code reaches what it runs: its supervised processes by name (started
with the environment's kubeconfig dropped), the apiserver as admin (GET, kubectl), and waiting
for a process or a node to be ready. ``LocalCluster`` (``controlplane``) builds on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kubetune.local.certs import Pki
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.layout import Layout, default_home
from kubetune.local.supervisor import Supervised


class ClusterError(RuntimeError):
    """The cluster could not be started, or is in a state ``up`` must not touch."""


class ClusterAccess:
    """The processes and apiserver of the cluster in one state directory."""

    def __init__(self, home: Path | None = None) -> None:
        self.layout = Layout((home or default_home()).resolve())
        self.pki = Pki(self.layout.pki)

    # -- supervised processes -------------------------------------------------

    def process(self, name: str) -> Supervised:
        return Supervised(name, self.layout.run, self.layout.logs)

    # -- the apiserver --------------------------------------------------------

    def kubectl(self, *args: str) -> str:
        """Run the cluster's kubectl as admin; its stdout."""
        info = ClusterInfo.load(self.layout)
        result = subprocess.run(
            [str(Path(info.bin_dir) / "kubectl"), f"--kubeconfig={self.layout.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` from the apiserver as admin."""
        info = ClusterInfo.load(self.layout)
        try:
            with urllib.request.urlopen(  # noqa: S310 (an https URL we built)
                info.server + path, context=self.pki.admin_context(), timeout=5
            ) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), bytes(error.read())

    def ready(self) -> bool:
        try:
            status, _ = self.get("/readyz")
        except (OSError, FileNotFoundError, ValueError):
            return False
        return status == 200

    # -- readiness ------------------------------------------------------------

    def node_ready(self, name: str) -> bool:
        """Ready, and the not-ready taint the apiserver sets on new nodes is gone."""
        try:
            status, body = self.get(f"/api/v1/nodes/{name}")
        except OSError:
            return False
        if status != 200:
            return False
        node = json.loads(body)
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        tainted = any(
            t["key"].startswith("node.kubernetes.io/") for t in node["spec"].get("taints", [])
        )
        return ready and not tainted

    def wait_node_ready(self, name: str, timeout: float = 120.0) -> None:
        self._wait(lambda: self.node_ready(name), f"node {name} Ready", timeout, f"kubelet-{name}")

    def _wait(self, check: Callable[[], bool], what: str, timeout: float, process: str) -> None:
        deadline = time.monotonic() + timeout
        supervised = self.process(process)
        while time.monotonic() < deadline:
            if check():
                return
            if supervised.exited_early():
                raise ClusterError(
                    f"{process} exited while waiting for {what}; last log lines "
                    f"({supervised.log_file}):\n{supervised.log_tail()}"
                )
            time.sleep(0.25)
        raise ClusterError(
            f"timed out after {timeout:.0f}s waiting for {what}; see {supervised.log_file}:\n"
            + supervised.log_tail()
        )

    # -- starting processes ---------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> Supervised:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        process = self.process(name)
        process.start(argv, env)
        return process

    def _start_python(self, name: str, module: str, *args: str) -> Supervised:
        return self._start(name, [sys.executable, "-m", module, *args])
