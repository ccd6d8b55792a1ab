"""Runs a real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, plus the local volume provisioner and
one node agent, all supervised under one state directory; and, when asked, Kueue, JobSet's
controller and an OCI registry beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubetune.local import components
from kubetune.local.binaries import binaries_dir, jobset_dir, kueue_dir, node_dir, registry_dir
from kubetune.local.certs import Pki, ensure_jobset_serving, ensure_kueue_serving, ensure_pki
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.images import default_store
from kubetune.local.layout import Layout, default_home
from kubetune.local.ports import free_port
from kubetune.local.real_node import RealNode
from kubetune.local.real_node_config import RealNodeSpec
from kubetune.local.supervisor import Supervised

DEFAULT_NODE_NAME = "kubetune-local"

# Start order; ``down`` stops them in reverse.
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
KUEUE = "kueue"
JOBSET = "jobset"
REGISTRY = "registry"
#: JobSet's CRD, as the apiserver serves it.
JOBSET_CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/jobsets.jobset.x-k8s.io"


class ClusterError(RuntimeError):
    """The cluster could not be started, or is in a state ``up`` must not touch."""


@dataclass(frozen=True)
class NodeOptions:
    """The first node agent ``up`` starts."""

    name: str = DEFAULT_NODE_NAME
    gpus: int = 1
    labels: Sequence[str] = ()  # key=value
    taints: Sequence[str] = ()  # key=value:Effect
    # Images run on the host, not from the image store (docs/local-cluster.md).
    host_images: Sequence[str] = ()
    #: ``agent``: the Python node agent; ``kubelet``: a real node (kubelet, containerd, runc).
    kind: str = "agent"
    #: Images of the image store a real node imports into its containerd when it starts.
    images: Sequence[str] = ()


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
        agents = sorted(
            p.stem
            for pattern in ("node-agent-*.pid", "kubelet-*.pid")
            for p in self.layout.run.glob(pattern)
        )
        extra = [n for n in (REGISTRY, JOBSET, KUEUE) if self.process(n).pid_file.exists()]
        return [self.process(n) for n in (*CONTROL_PLANE, "provisioner", *extra, *agents)]

    def running(self) -> dict[str, int | None]:
        """Pid (or None) of every process this cluster supervises."""
        return {p.name: p.pid() for p in self._all_processes()}

    # -- lifecycle ------------------------------------------------------------

    def up(
        self,
        node: NodeOptions | None = None,
        timeout: float = 120.0,
        *,
        kueue: bool = False,
        jobset: bool = False,
        registry: bool = False,
    ) -> ClusterInfo:
        """Start the cluster (with JobSet's controller when ``jobset``, Kueue when ``kueue``, an
        OCI registry when ``registry``), or return the running one, starting them in it when
        asked. Idempotent."""
        self.layout.create()
        state = self.running()
        alive = [name for name, pid in state.items() if pid is not None]
        if alive:
            if all(state[name] is not None for name in CONTROL_PLANE) and self.ready():
                if registry:
                    self.start_registry(timeout)
                if jobset:
                    self.start_jobset(timeout)
                if kueue:
                    self.start_kueue(timeout)
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
            self._start("etcd", components.etcd_argv(info, self.layout))
            self._wait(lambda: self._etcd_healthy(info), "etcd", timeout, "etcd")
            self._start("kube-apiserver", components.apiserver_argv(info, self.layout, pki))
            self._wait(self.ready, "kube-apiserver /readyz", timeout, "kube-apiserver")
            self._start(
                "kube-controller-manager",
                components.controller_manager_argv(info, self.layout, pki),
            )
            self._start("kube-scheduler", components.scheduler_argv(info, self.layout))
            self._start_python(
                "provisioner", "kubetune.local.provisioner", "--home", str(self.layout.home)
            )
            node = node or NodeOptions()
            if node.kind == "kubelet":
                self.start_real_node(node, timeout)
            else:
                self.start_node_agent(node)
            info.node_names = [node.name]
            info.save(self.layout)
            if node.kind != "kubelet":
                self.wait_node_ready(node.name, timeout)
            if registry:
                self.start_registry(timeout)
            # JobSet first: Kueue admits JobSets only if their CRD is there when it starts.
            if jobset:
                self.start_jobset(timeout)
            if kueue:
                self.start_kueue(timeout)
            info = ClusterInfo.load(self.layout)
        except BaseException:
            self.down()
            raise
        return info

    def down(self) -> list[str]:
        """Stop every supervised process (node agents first); returns what was running."""
        processes = self._all_processes()
        stopped = [p.name for p in processes if p.pid() is not None]
        agents = [p for p in processes if p.name.startswith(("node-agent-", "kubelet-"))]
        # Nodes first, so they can still terminate their pods' processes.
        for process in agents:
            process.stop()
        # Real nodes' pods, cgroups and namespaces: also what a crashed run left.
        for real in RealNode.all_in(self.layout.home):
            real.clean_up()
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
        for pattern in node.host_images:
            argv += ["--host-image", pattern]
        return self._start_python(f"node-agent-{node.name}", "kubetune.local.node_agent", *argv)

    def start_real_node(self, node: NodeOptions, timeout: float = 120.0) -> RealNode:
        """Start a real node (kubelet + containerd + runc + CNI, built from their Go modules by
        hack/node/build.sh), wait until it is Ready, give it ``node.gpus`` of
        ``nvidia.com/gpu`` capacity and import ``node.images`` from the image store."""
        if os.geteuid() != 0:
            raise ClusterError(
                "a real node (--node kubelet) needs root: namespaces, cgroups, mounts"
            )
        real = RealNode(self.layout.home, node.name)
        process = self.process(real.process_name)
        if process.pid() is not None:
            raise ClusterError(f"real node {node.name} runs already")
        # What an earlier run of this node left (a crash) goes first.
        real.clean_up()
        info = ClusterInfo.load(self.layout)
        real.prepare(
            RealNodeSpec(node.name, node.gpus, tuple(node.labels), tuple(node.taints)),
            bin_dir=node_dir(),
            pki=self.pki,
            apiserver_port=info.apiserver_port,
            admin_kubeconfig=self.layout.kubeconfig,
        )
        # A Node object left from an earlier run would look registered and Ready at once.
        self.kubectl("delete", "node", node.name, "--ignore-not-found", "--wait=false")
        self._start(real.process_name, real.argv())
        self._wait(
            lambda: self.get(f"/api/v1/nodes/{node.name}")[0] == 200,
            f"node {node.name} registered",
            timeout,
            real.process_name,
        )
        if node.gpus:
            # An extended resource no device plugin manages: the kubelet keeps what is patched in.
            patch = {"status": {"capacity": {"nvidia.com/gpu": str(node.gpus)}}}
            self.kubectl(
                "patch",
                "node",
                node.name,
                "--subresource=status",
                "--type=merge",
                "-p",
                json.dumps(patch),
            )
        self._wait(
            lambda: self.node_ready(node.name),
            f"node {node.name} Ready",
            timeout,
            real.process_name,
        )
        if node.images:
            self.import_images(node.name, node.images)
        return real

    def import_images(self, name: str, references: Sequence[str]) -> None:
        """Put images of the image store (``make images``) into real node ``name``'s containerd,
        unless it holds them already (the same digest)."""
        real = RealNode(self.layout.home, name)
        pid = self.process(real.process_name).pid()
        if pid is None:
            raise ClusterError(f"real node {name} is not running")
        real.import_images(pid, references, default_store())

    def stop_real_node(self, name: str) -> None:
        """Stop a real node: its kubelet and containerd, then every pod left in its cgroups."""
        real = RealNode(self.layout.home, name)
        self.process(real.process_name).stop()
        real.clean_up()

    def start_kueue(self, timeout: float = 120.0) -> None:
        """Install Kueue's CRDs and start its manager beside the running control plane, unless
        it runs already. Both come from the Go module hack/kueue pins (built on first use).
        Where JobSet's CRD is installed Kueue admits JobSets too; a Kueue started before it was
        is started again to take them on."""
        process = self.process(KUEUE)
        jobset = self.get(JOBSET_CRD_PATH)[0] == 200
        frameworks = components.kueue_frameworks(jobset=jobset)
        if process.pid() is not None:
            if self._kueue_frameworks() == frameworks:
                return
            process.stop()
        directory = kueue_dir()
        crds = str(directory / "crds")
        # Server-side: the CRDs are too large for client-side apply's annotation.
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds)
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "-f", crds)
        ensure_kueue_serving(self.pki)
        info = ClusterInfo.load(self.layout)
        info.kueue_dir = str(directory)
        info.kueue_health_port = free_port()
        config = components.kueue_config(
            info.kueue_health_port, webhook_port=free_port(), jobset=jobset
        )
        # JSON is valid YAML.
        self.layout.kueue_config.write_text(json.dumps(config, indent=2) + "\n")
        info.save(self.layout)
        self._start(KUEUE, components.kueue_argv(directory / "kueue", self.layout, self.pki))
        self._wait(lambda: self.kueue_ready(info), "Kueue /readyz", timeout, KUEUE)

    def _kueue_frameworks(self) -> list[str] | None:
        """The integrations the running Kueue was started with."""
        try:
            config = json.loads(self.layout.kueue_config.read_text())
        except (OSError, ValueError):
            return None
        frameworks = config.get("integrations", {}).get("frameworks")
        return list(frameworks) if isinstance(frameworks, list) else None

    def start_jobset(self, timeout: float = 120.0) -> None:
        """Install JobSet's CRD and start its controller beside the running control plane,
        unless it runs already. Both come from the Go module hack/jobset pins (built on first
        use). Its webhooks are registered with no apiserver (``components.jobset_config``). A
        Kueue running already is started again to admit JobSets."""
        process = self.process(JOBSET)
        if process.pid() is None:
            directory = jobset_dir()
            crds = str(directory / "crds")
            # Server-side: the CRD is too large for client-side apply's annotation.
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds)
            # Polled, not `kubectl wait`: that fails on a CRD whose conditions aren't set yet.
            deadline = time.monotonic() + timeout
            while not self._jobset_crd_established():
                if time.monotonic() > deadline:
                    raise ClusterError(f"JobSet's CRD not Established after {timeout:.0f}s")
                time.sleep(0.25)
            ensure_jobset_serving(self.pki)
            info = ClusterInfo.load(self.layout)
            info.jobset_dir = str(directory)
            info.jobset_health_port = free_port()
            config = components.jobset_config(info.jobset_health_port, webhook_port=free_port())
            self.layout.jobset_config.write_text(json.dumps(config, indent=2) + "\n")
            info.save(self.layout)
            self._start(JOBSET, components.jobset_argv(directory / "jobset", self.layout, self.pki))
            self._wait(lambda: self.jobset_ready(info), "JobSet /readyz", timeout, JOBSET)
        if self.process(KUEUE).pid() is not None:
            self.start_kueue(timeout)

    def start_registry(self, timeout: float = 120.0) -> None:
        """Start an OCI registry (distribution's, from the Go module hack/registry pins) on
        127.0.0.1 beside the cluster, unless it runs already: plain http, no login, its blobs
        under the state directory (kept by ``down``, removed by ``down --purge``)."""
        from kubetune.local.registry import registry_config, wait_until_answering

        process = self.process(REGISTRY)
        if process.pid() is not None:
            return
        directory = registry_dir()
        info = ClusterInfo.load(self.layout)
        info.registry_port = info.registry_port or free_port()
        config = registry_config(info.registry_port, self.layout.registry_storage)
        self.layout.registry_config.write_text(json.dumps(config, indent=2) + "\n")
        info.save(self.layout)
        self._start(
            REGISTRY, [str(directory / "registry"), "serve", str(self.layout.registry_config)]
        )
        try:
            wait_until_answering(info.registry_port, timeout, process.exited_early)
        except RuntimeError as exc:
            raise ClusterError(f"{exc}; see {process.log_file}") from None

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

    # -- readiness ------------------------------------------------------------

    def kueue_ready(self, info: ClusterInfo | None = None) -> bool:
        """Kueue's manager answers its readiness probe (caches synced, webhook server up)."""
        return _probe_ready((info or ClusterInfo.load(self.layout)).kueue_health_port)

    def _jobset_crd_established(self) -> bool:
        status, body = self.get(JOBSET_CRD_PATH)
        if status != 200:
            return False
        conditions = json.loads(body).get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def jobset_ready(self, info: ClusterInfo | None = None) -> bool:
        """JobSet's manager answers its readiness probe (its webhook server is up)."""
        return _probe_ready((info or ClusterInfo.load(self.layout)).jobset_health_port)

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

    # -- starting processes ---------------------------------------------------

    def _write_kubeconfig(self, info: ClusterInfo, pki: Pki) -> None:
        # JSON is valid YAML, and keeps this module free of a YAML dependency.
        config = components.admin_kubeconfig(info, pki)
        self.layout.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.layout.kubeconfig.chmod(0o600)

    def _start(self, name: str, argv: list[str]) -> Supervised:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        process = self.process(name)
        process.start(argv, env)
        return process

    def _start_python(self, name: str, module: str, *args: str) -> Supervised:
        return self._start(name, [sys.executable, "-m", module, *args])


def _probe_ready(port: int | None) -> bool:
    """A controller manager's health server on loopback ``port`` answers /readyz with 200."""
    if not port:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False
