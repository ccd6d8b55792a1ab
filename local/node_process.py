"""A real node's supervised process, ``python -m kubetune.local.node_process STATE_DIR``: it joins
the node's cgroup subtree (``node_cgroups``), enters the node's namespaces (``node_namespaces``),
starts containerd, imports the pause image, starts the kubelet, kube-proxy, CoreDNS and
kube-router, watches them, and on SIGTERM stops them all. ``RealNode`` (``real_node``) prepares
its state and starts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kubetune.local import real_node_config as config
from kubetune.local.node_cgroups import join_cgroup
from kubetune.local.node_namespaces import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    forward_apiserver,
    make_network,
    mount_overlays,
    run,
    unshare,
)
from kubetune.local.real_node import NodeState, claim_containerd_root, ctr_argv


class _Children:
    """The node's components, each logging to ``logs/<name>.log``; stopped in reverse order."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], keep: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env, pass_fds=keep
            )
        self.started.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                child.kill()


def _wait_for(check: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def run_node(state_dir: Path) -> int:
    node = NodeState.load(state_dir)
    bin_dir = Path(node.bin_dir)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    join_cgroup(node.ident, os.getpid())
    host_netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    unshare(CLONE_NEWNS | CLONE_NEWNET)
    mount_overlays(state_dir)
    make_network(node, host_netns)
    forward_apiserver(node.apiserver_port, host_netns)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
    }
    children = _Children(logs, env)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    root, root_lock = claim_containerd_root(Path(node.containerd_slots))
    (state_dir / "containerd.toml").write_text(
        config.containerd_config(bin_dir, root, state_dir / "cni")
    )
    try:
        watched = _start_components(node, state_dir, children, root_lock)
        print(
            f"node {node.name}: containerd, kubelet, kube-proxy, CoreDNS, kube-router running",
            flush=True,
        )
        return _watch(node, state_dir, children, watched, stopping)
    finally:
        children.stop()


def _start_components(
    node: NodeState, state_dir: Path, children: _Children, root_lock: int
) -> dict[str, subprocess.Popen[bytes]]:
    """Start containerd (holding its root's lock), import the pause image, then the rest."""
    bin_dir = Path(node.bin_dir)
    containerd = children.start(
        "containerd",
        [str(bin_dir / "containerd"), "--config", str(state_dir / "containerd.toml")],
        keep=(root_lock,),
    )
    _wait_for(lambda: _socket_answers(config.CONTAINERD_SOCKET), "containerd's socket", containerd)
    run(
        *ctr_argv(bin_dir, "images", "import", str(state_dir / "pause.tar")),
        env=children.env,
        stdout=subprocess.DEVNULL,
    )
    kubelet = children.start("kubelet", kubelet_argv(node, state_dir))
    proxy = children.start(
        "kube-proxy",
        [str(bin_dir / "kube-proxy"), f"--config={state_dir / 'kube-proxy.yaml'}", "--v=1"],
    )
    dns = children.start(
        "coredns", [str(bin_dir / "coredns"), "-conf", str(state_dir / "Corefile")]
    )
    policies = children.start("kube-router", kube_router_argv(node, state_dir))
    return {
        "containerd": containerd,
        "kubelet": kubelet,
        "kube-proxy": proxy,
        "coredns": dns,
        "kube-router": policies,
    }


def _watch(
    node: NodeState,
    state_dir: Path,
    children: _Children,
    watched: dict[str, subprocess.Popen[bytes]],
    stopping: threading.Event,
) -> int:
    """Until ``stopping``: 0; 1 as soon as a component but kube-router exits."""
    while not stopping.is_set():
        for what, child in watched.items():
            if child.poll() is None:
                continue
            print(f"node {node.name}: {what} exited with {child.returncode}", flush=True)
            if what != "kube-router":
                return 1
            # kube-router exits until the kubelet has registered the Node; it is
            # started again, as a DaemonSet's pod would be.
            watched[what] = children.start(what, kube_router_argv(node, state_dir))
        stopping.wait(1.0)
    return 0


def kube_router_argv(node: NodeState, state_dir: Path) -> list[str]:
    """kube-router as the node's NetworkPolicy enforcer only (iptables and ipsets in the node's
    network namespace): no routing, no service proxy (kube-proxy's), no CNI configuration."""
    return [
        str(Path(node.bin_dir) / "kube-router"),
        f"--kubeconfig={state_dir / 'kube-router.kubeconfig'}",
        f"--hostname-override={node.name}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--enable-cni=false",
        f"--service-cluster-ip-range={config.SERVICE_NETWORK}",
        "--health-port=0",
        "--v=1",
    ]


def kubelet_argv(node: NodeState, state_dir: Path) -> list[str]:
    argv = [
        str(Path(node.bin_dir) / "kubelet"),
        f"--config={state_dir / 'kubelet.yaml'}",
        f"--kubeconfig={state_dir / 'kubelet.kubeconfig'}",
        "--root-dir=/var/lib/kubelet",
        f"--node-ip={node.node_address}",
        f"--hostname-override={node.name}",
        "--v=1",
    ]
    if node.labels:
        argv.append("--node-labels=" + ",".join(node.labels))
    if node.taints:
        argv.append("--register-with-taints=" + ",".join(node.taints))
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m kubetune.local.node_process STATE_DIR", file=sys.stderr)
        return 2
    return run_node(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
