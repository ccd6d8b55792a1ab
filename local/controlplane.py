"""Runs a real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, plus the local volume provisioner and real nodes
(kubelet, containerd, runc: ``real_node``), all supervised under one state directory by
``LocalCluster``'s ``up`` and ``down``; when asked, Kueue, JobSet's controller and an OCI
registry beside them (``addons``).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from kubetune.local import components
from kubetune.local.addons import JOBSET, KUEUE, REGISTRY, AddOns
from kubetune.local.binaries import binaries_dir, node_dir
from kubetune.local.certs import Pki, ensure_pki
from kubetune.local.cluster_access import ClusterError
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.images import default_store
from kubetune.local.ports import free_port
from kubetune.local.real_node import RealNode
from kubetune.local.real_node_config import RealNodeSpec
from kubetune.local.supervisor import Supervised

DEFAULT_NODE_NAME = "kubetune-local"

# Start order; ``down`` stops them in reverse.
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


@dataclass(frozen=True)
class NodeOptions:
    """The first node ``up`` starts: a real node (docs/local-cluster.md)."""

    name: str = DEFAULT_NODE_NAME
    gpus: int = 1
    labels: Sequence[str] = ()  # key=value
    taints: Sequence[str] = ()  # key=value:Effect
    #: Images of the image store a real node imports into its containerd when it starts.
    images: Sequence[str] = ()


class LocalCluster(AddOns):
    """One local cluster, identified by its state directory."""

    def _all_processes(self) -> list[Supervised]:
        agents = sorted(p.stem for p in self.layout.run.glob("kubelet-*.pid"))
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
                self.start_add_ons(timeout, registry=registry, jobset=jobset, kueue=kueue)
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
            self.start_real_node(node, timeout)
            info.node_names = [node.name]
            info.save(self.layout)
            self.start_add_ons(timeout, registry=registry, jobset=jobset, kueue=kueue)
            info = ClusterInfo.load(self.layout)
        except BaseException:
            self.down()
            raise
        return info

    def down(self) -> list[str]:
        """Stop every supervised process (nodes first); returns what was running."""
        processes = self._all_processes()
        stopped = [p.name for p in processes if p.pid() is not None]
        agents = [p for p in processes if p.name.startswith("kubelet-")]
        # Nodes first, so they can still terminate their pods' processes.
        for process in agents:
            process.stop()
        # Real nodes' pods, cgroups and namespaces: also what a crashed run left.
        for real in RealNode.all_in(self.layout.home):
            real.clean_up()
        for process in reversed([p for p in processes if p not in agents]):
            process.stop()
        return stopped

    def start_real_node(self, node: NodeOptions, timeout: float = 120.0) -> RealNode:
        """Start a real node (kubelet + containerd + runc + CNI, built from their Go modules by
        hack/node/build.sh), wait until it is Ready, give it ``node.gpus`` of
        ``nvidia.com/gpu`` capacity and import ``node.images`` from the image store."""
        if os.geteuid() != 0:
            raise ClusterError(
                "the local cluster's node (kubelet, containerd, runc) needs root: namespaces, "
                "cgroups, mounts"
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

    def _etcd_healthy(self, info: ClusterInfo) -> bool:
        try:
            url = f"http://127.0.0.1:{info.etcd_port}/health"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _write_kubeconfig(self, info: ClusterInfo, pki: Pki) -> None:
        # JSON is valid YAML, and keeps this module free of a YAML dependency.
        config = components.admin_kubeconfig(info, pki)
        self.layout.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.layout.kubeconfig.chmod(0o600)
