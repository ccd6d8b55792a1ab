"""Runs a real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, plus the local volume provisioner and
one node agent, all supervised under one state directory.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kubetune.local.binaries import binaries_dir
from kubetune.local.certs import Pki, ensure_pki
from kubetune.local.layout import Layout, default_home
from kubetune.local.supervisor import Supervised

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_NODE_NAME = "kubetune-local"

# Start order; ``down`` stops them in reverse.
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ClusterError(RuntimeError):
    """The cluster could not be started, or is in a state ``up`` must not touch."""


@dataclass
class ClusterInfo:
    """What ``up`` chose, persisted as cluster.json for ``status``, node agents and tests."""

    home: str
    bin_dir: str
    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int
    node_names: list[str] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @classmethod
    def load(cls, layout: Layout) -> ClusterInfo:
        return cls(**json.loads(layout.cluster_file.read_text()))

    def save(self, layout: Layout) -> None:
        layout.cluster_file.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class NodeOptions:
    """The first node agent ``up`` starts."""

    name: str = DEFAULT_NODE_NAME
    gpus: int = 1
    labels: Sequence[str] = ()  # key=value
    taints: Sequence[str] = ()  # key=value:Effect


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalCluster:
    """One local cluster, identified by its state directory."""

    def __init__(self, home: Path | None = None) -> None:
        self.layout = Layout((home or default_home()).resolve())
        self.pki = Pki(self.layout.pki)

    # -- supervised processes -------------------------------------------------

    def process(self, name: str) -> Supervised:
        return Supervised(name, self.layout.run, self.layout.logs)

    def node_agent_process(self, node_name: str) -> Supervised:
        return self.process(f"node-agent-{node_name}")

    def _all_processes(self) -> list[Supervised]:
        agents = sorted(p.stem for p in self.layout.run.glob("node-agent-*.pid"))
        return [self.process(n) for n in (*CONTROL_PLANE, "provisioner", *agents)]

    def running(self) -> dict[str, int | None]:
        """Pid (or None) of every process this cluster supervises."""
        return {p.name: p.pid() for p in self._all_processes()}

    # -- lifecycle ------------------------------------------------------------

    def up(self, node: NodeOptions | None = None, timeout: float = 120.0) -> ClusterInfo:
        """Start the cluster, or return the running one. Idempotent."""
        self.layout.create()
        state = self.running()
        alive = [name for name, pid in state.items() if pid is not None]
        if alive:
            if all(state[name] is not None for name in CONTROL_PLANE) and self.ready():
                return ClusterInfo.load(self.layout)
            raise ClusterError(
                f"a partly running cluster is in {self.layout.home} ({', '.join(alive)}); "
                "run `kubetune local down` first"
            )
        bin_dir = binaries_dir()
        pki = ensure_pki(self.layout.pki)
        info = ClusterInfo(
            home=str(self.layout.home),
            bin_dir=str(bin_dir),
            etcd_port=free_port(),
            etcd_peer_port=free_port(),
            apiserver_port=free_port(),
        )
        info.save(self.layout)
        self._write_kubeconfig(info, pki)
        try:
            self._start_etcd(info)
            self._wait(lambda: self._etcd_healthy(info), "etcd", timeout, "etcd")
            self._start_apiserver(info, pki)
            self._wait(self.ready, "kube-apiserver /readyz", timeout, "kube-apiserver")
            self._start_controller_manager(info, pki)
            self._start_scheduler(info)
            self._start_python(
                "provisioner", "kubetune.local.provisioner", "--home", str(self.layout.home)
            )
            node = node or NodeOptions()
            self.start_node_agent(node)
            info.node_names = [node.name]
            info.save(self.layout)
            self.wait_node_ready(node.name, timeout)
        except BaseException:
            self.down()
            raise
        return info

    def down(self) -> list[str]:
        """Stop every supervised process (node agents first); returns what was running."""
        processes = self._all_processes()
        stopped = [p.name for p in processes if p.pid() is not None]
        agents = [p for p in processes if p.name.startswith("node-agent-")]
        # Node agents first, so they can still terminate their pods' processes.
        for process in agents:
            process.stop()
        for process in reversed([p for p in processes if p not in agents]):
            process.stop()
        return stopped

    def start_node_agent(self, node: NodeOptions) -> Supervised:
        argv = [
            "--home",
            str(self.layout.home),
            "--name",
            node.name,
            "--gpus",
            str(node.gpus),
        ]
        for label in node.labels:
            argv += ["--label", label]
        for taint in node.taints:
            argv += ["--taint", taint]
        return self._start_python(f"node-agent-{node.name}", "kubetune.local.node_agent", *argv)

    # -- readiness ------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` from the apiserver as admin."""
        info = ClusterInfo.load(self.layout)
        try:
            with urllib.request.urlopen(  # noqa: S310 (an https URL we built)
                info.server + path, context=self._ssl_context(), timeout=5
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

    def _etcd_healthy(self, info: ClusterInfo) -> bool:
        try:
            url = f"http://127.0.0.1:{info.etcd_port}/health"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

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
        self._wait(
            lambda: self.node_ready(name), f"node {name} Ready", timeout, f"node-agent-{name}"
        )

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

    # -- components -----------------------------------------------------------

    def _write_kubeconfig(self, info: ClusterInfo, pki: Pki) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-local",
                    "cluster": {"server": info.server, "certificate-authority": str(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "kubetune-admin",
                    "user": {
                        "client-certificate": str(pki.admin_cert),
                        "client-key": str(pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "kubetune-local",
                    "context": {
                        "cluster": "kubetune-local",
                        "user": "kubetune-admin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "kubetune-local",
        }
        # JSON is valid YAML, and keeps this module free of a YAML dependency.
        self.layout.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.layout.kubeconfig.chmod(0o600)

    def _binary(self, info: ClusterInfo, name: str) -> str:
        return str(Path(info.bin_dir) / name)

    def _start(self, name: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.process(name).start(argv, env)

    def _start_python(self, name: str, module: str, *args: str) -> Supervised:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        process = self.process(name)
        process.start([sys.executable, "-m", module, *args], env)
        return process

    def _start_etcd(self, info: ClusterInfo) -> None:
        client = f"http://127.0.0.1:{info.etcd_port}"
        peer = f"http://127.0.0.1:{info.etcd_peer_port}"
        self._start(
            "etcd",
            [
                self._binary(info, "etcd"),
                "--name=kubetune",
                f"--data-dir={self.layout.etcd_data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=kubetune={peer}",
                # A throwaway development cluster: durability is not worth the fsync latency.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self, info: ClusterInfo, pki: Pki) -> None:
        self._start(
            "kube-apiserver",
            [
                self._binary(info, "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{info.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={info.apiserver_port}",
                f"--cert-dir={self.layout.pki}",
                f"--tls-cert-file={pki.apiserver_cert}",
                f"--tls-private-key-file={pki.apiserver_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--token-auth-file={pki.token_auth_file}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # The 'kubernetes' Service would get a loopback endpoint, which validation
                # rejects; pods reach the apiserver through KUBERNETES_SERVICE_HOST instead.
                "--endpoint-reconciler-type=none",
                # `kubectl logs` is proxied to the node agent's HTTPS server on its InternalIP.
                f"--kubelet-client-certificate={pki.kubelet_client_cert}",
                f"--kubelet-client-key={pki.kubelet_client_key}",
                # Node agents serve with a certificate from the same CA (SAN 127.0.0.1).
                f"--kubelet-certificate-authority={pki.ca_cert}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
            ],
        )

    def _start_controller_manager(self, info: ClusterInfo, pki: Pki) -> None:
        kubeconfig = str(self.layout.kubeconfig)
        self._start(
            "kube-controller-manager",
            [
                self._binary(info, "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                # The defaults ('*') include job, garbage-collector, namespace, serviceaccount,
                # serviceaccount-token, root-ca-cert-publisher, persistentvolume-binder,
                # ttl-after-finished, node-lifecycle and pod-garbage-collector.
                "--controllers=*",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--v=1",
            ],
        )

    def _start_scheduler(self, info: ClusterInfo) -> None:
        kubeconfig = str(self.layout.kubeconfig)
        self._start(
            "kube-scheduler",
            [
                self._binary(info, "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--v=1",
            ],
        )
