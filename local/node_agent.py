"""A node agent: registers a Node, keeps it Ready, and runs the pods bound to it
as local processes (see pod_worker). Started by ``kubetune local up``, or alone
to add a node to a running local cluster::

    python -m kubetune.local.node_agent --home ~/.kubetune/local --name gpu-2 --gpus 2
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from kubetune.local.certs import Pki
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.gpus import GPU_RESOURCE, GpuAllocator
from kubetune.local.images import ImageStore, default_store
from kubetune.local.layout import Layout, default_home
from kubetune.local.log_server import LogServer
from kubetune.local.node_config import NodeConfig, parse_taint
from kubetune.local.node_heartbeat import NodeHeartbeat
from kubetune.local.pod_dispatch import PodDispatcher
from kubetune.local.ports import free_port
from kubetune.local.rest import Rest

log = logging.getLogger("kubetune.local.node_agent")

HOST_IP = "127.0.0.1"
# Variables a pod inherits from the agent (the rest of its environment is its own).
DEFAULT_PASS_ENV = ("LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def service_env(apiserver_port: int) -> dict[str, str]:
    """The in-cluster apiserver address, as every container gets it (image or host)."""
    port = str(apiserver_port)
    return {
        "KUBERNETES_SERVICE_HOST": HOST_IP,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": f"tcp://{HOST_IP}:{port}",
    }


def pod_base_env(apiserver_port: int, pass_env: Sequence[str] = ()) -> dict[str, str]:
    """The environment a host-image container starts from: this Python's bin first on PATH, the
    in-cluster apiserver address, and the host variables the node passes through."""
    # The venv's bin first, so `kubetune-trainer` and this Python are what pods find.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {"PATH": path, **service_env(apiserver_port)}
    for name in (*DEFAULT_PASS_ENV, *pass_env):
        if name in os.environ:
            env[name] = os.environ[name]
    env.setdefault("LANG", "C.UTF-8")
    return env


class NodeAgent:
    """One node of a local cluster: its heartbeats, its pods and its kubelet port."""

    def __init__(self, home: Path, config: NodeConfig) -> None:
        self.layout = Layout(home)
        self.info = ClusterInfo.load(self.layout)
        self.pki = Pki(self.layout.pki)
        self.rest = Rest(self.info.server, self.pki)
        self.config = config
        self.node_dir = self.layout.nodes / config.name
        # One tmpfs directory per node agent (keyed by its state dir, as several
        # clusters may share the host), removed whole when the agent stops.
        node_key = hashlib.sha256(str(self.node_dir).encode()).hexdigest()[:12]
        self.memory_dir = Path("/dev/shm") / f"kubetune-{config.name}-{node_key}"
        self._stopping = threading.Event()
        self.pods = PodDispatcher(
            self.rest,
            node_name=config.name,
            host_ip=HOST_IP,
            node_dir=self.node_dir,
            memory_dir=self.memory_dir,
            gpus=GpuAllocator(config.gpus),
            base_env=lambda: pod_base_env(self.info.apiserver_port, config.pass_env),
            images=ImageStore(config.image_store or default_store(), config.host_images),
            image_env=lambda: service_env(self.info.apiserver_port),
        )
        self.log_server = LogServer(
            HOST_IP,
            free_port(),
            self.pki.node_serving.cert,
            self.pki.node_serving.key,
            self.pods.find_worker,
        )
        self.heartbeat = NodeHeartbeat(
            self.rest, config, HOST_IP, self.log_server.port, self.layout.home
        )

    def run(self) -> None:
        if shutil.which("bwrap") is None:
            # Refuse to register a node that could only fail every pod.
            raise SystemExit("bwrap not found: install bubblewrap (hack/cluster/build.sh does)")
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self.log_server.start()
        self.heartbeat.register()
        log.info(
            "node %s registered (kubelet port %d, %d GPUs)",
            self.config.name,
            self.log_server.port,
            self.config.gpus,
        )
        threading.Thread(
            target=self.heartbeat.beat_until, args=(self._stopping,), name="heartbeat", daemon=True
        ).start()
        threading.Thread(
            target=self.pods.watch_until, args=(self._stopping,), name="pod-watch", daemon=True
        ).start()
        threading.Thread(
            target=self.pods.dns.refresh_until,
            args=(self._stopping,),
            name="pod-dns",
            daemon=True,
        ).start()
        self._stopping.wait()

    def stop(self) -> None:
        """Stop every pod's processes (SIGTERM, short grace), then exit."""
        self._stopping.set()
        self.pods.stop_all(grace_seconds=5, wait_seconds=10)
        shutil.rmtree(self.memory_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.local.node_agent", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--home", type=Path, default=default_home(), help="cluster state dir")
    parser.add_argument("--name", required=True, help="Node name")
    parser.add_argument("--gpus", type=int, default=1, help=f"{GPU_RESOURCE} capacity")
    parser.add_argument("--cpu", default="", help="cpu capacity (default: host cores)")
    parser.add_argument("--memory", default="", help="memory capacity (default: host memory)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    parser.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="host environment variable pods inherit (repeatable)",
    )
    parser.add_argument(
        "--host-image",
        action="append",
        default=[],
        metavar="PATTERN",
        help="images (shell-style patterns, '*' for all) whose containers run on the host's "
        "Python and PATH instead of in the image (the fast mode; repeatable)",
    )
    parser.add_argument(
        "--image-store",
        type=Path,
        default=None,
        help="the image store (default: where make images puts it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    pass_env = [
        *args.pass_env,
        *filter(None, os.environ.get("KUBETUNE_NODE_PASS_ENV", "").split(",")),
    ]
    config = NodeConfig(
        name=args.name,
        gpus=args.gpus,
        cpu=args.cpu,
        memory=args.memory,
        labels=dict(label.split("=", 1) for label in args.label),
        taints=[parse_taint(t) for t in args.taint],
        pass_env=pass_env,
        host_images=args.host_image,
        image_store=args.image_store,
    )
    agent = NodeAgent(args.home.resolve(), config)

    def on_signal(signum: int, _: object) -> None:
        log.info("signal %d: stopping pods", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
