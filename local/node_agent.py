"""A node agent: registers a Node, keeps it Ready, and runs the pods bound to it
as local processes (see pod_worker). Started by ``kubetune local up``, or alone
to add a node to a running local cluster::

    python -m kubetune.local.node_agent --home ~/.kubetune/local --name gpu-2 --gpus 2
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kubetune.local.certs import Pki
from kubetune.local.controlplane import ClusterInfo, free_port
from kubetune.local.layout import Layout, default_home
from kubetune.local.log_server import LogServer
from kubetune.local.pod_worker import NodeContext, PodWorker, now
from kubetune.local.rest import JSON, STRATEGIC_MERGE_PATCH, ApiError, Rest, path_for

log = logging.getLogger("kubetune.local.node_agent")

HOST_IP = "127.0.0.1"
GPU_RESOURCE = "nvidia.com/gpu"
LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10
STATUS_REPORT_SECONDS = 20
# Variables a pod inherits from the agent (the rest of its environment is its own).
DEFAULT_PASS_ENV = ("LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


@dataclass
class NodeConfig:
    name: str
    gpus: int = 1
    cpu: str = ""
    memory: str = ""
    max_pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JSON] = field(default_factory=list)
    pass_env: Sequence[str] = ()


def parse_taint(text: str) -> JSON:
    """``key[=value]:Effect`` as in ``kubectl taint``."""
    key_value, _, effect = text.rpartition(":")
    if not key_value or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(
            f"taint {text!r}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
        )
    key, _, value = key_value.partition("=")
    taint: JSON = {"key": key, "effect": effect}
    if value:
        taint["value"] = value
    return taint


def _host_memory() -> str:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1])}Ki"
    return "8Gi"


class NodeAgent:
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
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self._by_name: dict[tuple[str, str], PodWorker] = {}
        self._lock = threading.Lock()
        self._gpus_free = list(range(config.gpus))
        self._gpus_held: dict[str, list[int]] = {}
        self._stopping = threading.Event()
        self._deleting: set[str] = set()  # uids whose deletion the agent must finish
        self.log_server = LogServer(
            HOST_IP,
            free_port(),
            self.pki.node_serving_cert,
            self.pki.node_serving_key,
            self.find_worker,
        )

    # -- node registration and heartbeats ----------------------------------------

    def _node_object(self) -> JSON:
        capacity = {
            "cpu": self.config.cpu or str(os.cpu_count() or 1),
            "memory": self.config.memory or _host_memory(),
            "pods": str(self.config.max_pods),
            "ephemeral-storage": f"{shutil.disk_usage(self.layout.home).total // 1024}Ki",
        }
        if self.config.gpus:
            capacity[GPU_RESOURCE] = str(self.config.gpus)
        labels = {
            "kubernetes.io/hostname": self.config.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            ),
            **self.config.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.config.name, "labels": labels},
            "spec": {"taints": self.config.taints},
            "status": {
                "capacity": capacity,
                "allocatable": dict(capacity),
                "conditions": self._conditions(),
                "addresses": [
                    {"type": "InternalIP", "address": HOST_IP},
                    {"type": "Hostname", "address": self.config.name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
                "nodeInfo": {
                    "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.config.name).hex,
                    "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.config.name)),
                    "bootID": str(uuid.uuid4()),
                    "kernelVersion": platform.release(),
                    "osImage": "kubetune local node",
                    "containerRuntimeVersion": "kubetune-bubblewrap://0",
                    "kubeletVersion": "v1.34.0-kubetune",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": labels["kubernetes.io/arch"],
                },
            },
        }

    def _conditions(self) -> list[JSON]:
        stamp = now()
        healthy = [
            ("MemoryPressure", "KubeletHasSufficientMemory"),
            ("DiskPressure", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "KubeletHasSufficientPID"),
        ]
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": reason,
                "message": reason,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
            for kind, reason in healthy
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubetune node agent is posting ready status",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
        )
        return conditions

    def register(self) -> None:
        node = self._node_object()
        try:
            self.rest.post("/api/v1/nodes", node)
        except ApiError as error:
            if error.status != 409:
                raise
            # Re-registration after a restart: take over labels, taints and status.
            self.rest.patch(
                path_for(None, "nodes", self.config.name),
                {
                    "metadata": {"labels": node["metadata"]["labels"]},
                    "spec": {"taints": self.config.taints or None},
                },
            )
        self.rest.patch(
            path_for(None, "nodes", self.config.name, "status"),
            {"status": node["status"]},
            STRATEGIC_MERGE_PATCH,
        )

    def _renew_lease(self) -> None:
        name = self.config.name
        renew = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        group = "coordination.k8s.io/v1"
        try:
            self.rest.patch(
                path_for("kube-node-lease", "leases", name, group=group),
                {"spec": {"renewTime": renew, "holderIdentity": name}},
            )
        except ApiError as error:
            if error.status != 404:
                raise
            node = self.rest.get(path_for(None, "nodes", name))
            self.rest.post(
                path_for("kube-node-lease", "leases", group=group),
                {
                    "metadata": {
                        "name": name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": name,
                                "uid": node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": {
                        "holderIdentity": name,
                        "renewTime": renew,
                        "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                    },
                },
            )

    def _heartbeat_loop(self) -> None:
        last_status = 0.0
        while not self._stopping.is_set():
            try:
                self._renew_lease()
                if time.monotonic() - last_status >= STATUS_REPORT_SECONDS:
                    status = {
                        "conditions": self._conditions(),
                        "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
                    }
                    self.rest.patch(
                        path_for(None, "nodes", self.config.name, "status"),
                        {"status": status},
                        STRATEGIC_MERGE_PATCH,
                    )
                    last_status = time.monotonic()
            except Exception as error:  # keep beating through apiserver hiccups
                if isinstance(error, ApiError) and error.status == 404:
                    log.warning("node %s was deleted; registering again", self.config.name)
                    self._try(self.register)
                else:
                    log.warning("heartbeat failed: %s", error)
            self._stopping.wait(LEASE_RENEW_SECONDS)

    def _try(self, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as error:
            log.warning("%s", error)

    # -- pods -----------------------------------------------------------------------

    def find_worker(self, namespace: str, name: str) -> PodWorker | None:
        with self._lock:
            return self._by_name.get((namespace, name))

    def _base_env(self) -> dict[str, str]:
        # The venv's bin first, so `kubetune-trainer` and this Python are what pods find.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        port = str(self.info.apiserver_port)
        env = {
            "PATH": path,
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{HOST_IP}:{port}",
        }
        for name in (*DEFAULT_PASS_ENV, *self.config.pass_env):
            if name in os.environ:
                env[name] = os.environ[name]
        env.setdefault("LANG", "C.UTF-8")
        return env

    def _gpu_request(self, pod: JSON) -> int:
        total = 0
        for container in pod["spec"].get("containers", []):
            resources = container.get("resources", {})
            value = resources.get("limits", {}).get(GPU_RESOURCE) or resources.get(
                "requests", {}
            ).get(GPU_RESOURCE)
            total += int(value or 0)
        return total

    def _start(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        env_extra: dict[str, str] = {}
        wanted = self._gpu_request(pod)
        if wanted:
            # The scheduler already accounted for capacity; pick which devices.
            held, self._gpus_free = self._gpus_free[:wanted], self._gpus_free[wanted:]
            self._gpus_held[uid] = held
            env_extra["CUDA_VISIBLE_DEVICES"] = env_extra["NVIDIA_VISIBLE_DEVICES"] = ",".join(
                map(str, held)
            )
        context = NodeContext(
            node_name=self.config.name,
            host_ip=HOST_IP,
            pods_dir=self.node_dir / "pods",
            base_env=self._base_env(),
            memory_dir=self.memory_dir,
            device_paths=tuple(sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/dri"))),
        )
        worker = PodWorker(self.rest, context, pod, env_extra, on_finished=self._finished)
        self.workers[uid] = worker
        self._by_name[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = worker
        log.info("starting pod %s/%s", pod["metadata"]["namespace"], pod["metadata"]["name"])
        worker.start()

    def _finished(self, worker: PodWorker) -> None:
        with self._lock:
            self._gpus_free += self._gpus_held.pop(worker.uid, [])
            deleting = worker.uid in self._deleting
        if deleting:
            self._remove(worker.namespace, worker.pod_name, worker.uid)

    def _remove(self, namespace: str, name: str, uid: str) -> None:
        """Final deletion (grace 0) once nothing of the pod runs, as a kubelet does."""
        try:
            self.rest.delete(
                path_for(namespace, "pods", name),
                {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
            )
        except ApiError as error:
            if error.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", namespace, name, error)

    def _cleanup(self, uid: str) -> None:
        with self._lock:
            worker = self.workers.pop(uid, None)
            if worker is not None:
                key = (worker.namespace, worker.pod_name)
                if self._by_name.get(key) is worker:
                    del self._by_name[key]
            self._deleting.discard(uid)
        shutil.rmtree(self.node_dir / "pods" / uid, ignore_errors=True)
        shutil.rmtree(self.memory_dir / uid, ignore_errors=True)

    def sync(self, event_type: str, pod: JSON) -> None:
        meta = pod["metadata"]
        uid: str = meta["uid"]
        namespace, name = meta["namespace"], meta["name"]
        if event_type == "DELETED":
            worker = self.workers.get(uid)
            if worker is not None:
                worker.request_stop(0)
                worker.finished.wait(10)
            self._cleanup(uid)
            return
        phase = pod.get("status", {}).get("phase")
        deleting = meta.get("deletionTimestamp") is not None
        with self._lock:
            worker = self.workers.get(uid)
            if deleting:
                self._deleting.add(uid)
        if worker is not None:
            if deleting:
                grace = float(meta.get("deletionGracePeriodSeconds") or 0)
                worker.request_stop(grace)
                if worker.finished.is_set():
                    self._remove(namespace, name, uid)
            return
        if deleting:
            self._remove(namespace, name, uid)
            return
        if phase in ("Succeeded", "Failed"):
            return
        if phase == "Running":
            # Left over from an earlier agent, whose processes died with it
            # (--die-with-parent): report that rather than run it a second time.
            self._try(
                lambda: self.rest.patch(
                    path_for(namespace, "pods", name, "status"),
                    {
                        "status": {
                            "phase": "Failed",
                            "reason": "NodeAgentRestarted",
                            "message": "the node agent restarted while the pod ran",
                        }
                    },
                    STRATEGIC_MERGE_PATCH,
                )
            )
            return
        with self._lock:
            self._start(pod)

    def _watch_loop(self) -> None:
        selector = f"spec.nodeName={self.config.name}"
        while not self._stopping.is_set():
            try:
                listing = self.rest.get("/api/v1/pods", fieldSelector=selector)
                seen = set()
                for pod in listing.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self.sync("ADDED", pod)
                for uid in set(self.workers) - seen:
                    worker = self.workers[uid]
                    self.sync("DELETED", worker.pod)
                version = listing["metadata"]["resourceVersion"]
                for event in self.rest.watch("/api/v1/pods", version, fieldSelector=selector):
                    if self._stopping.is_set():
                        return
                    kind, obj = event["type"], event["object"]
                    if kind == "BOOKMARK":
                        continue
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: list again
                    self.sync(kind, obj)
            except Exception as error:
                if not self._stopping.is_set():
                    log.warning("pod watch: %s; listing again", error)
                    time.sleep(1)

    # -- lifecycle ------------------------------------------------------------------

    def run(self) -> None:
        if shutil.which("bwrap") is None:
            # Refuse to register a node that could only fail every pod.
            raise SystemExit("bwrap not found: install bubblewrap (hack/cluster/build.sh does)")
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self.log_server.start()
        self.register()
        log.info(
            "node %s registered (kubelet port %d, %d GPUs)",
            self.config.name,
            self.log_server.port,
            self.config.gpus,
        )
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._watch_loop, name="pod-watch", daemon=True).start()
        self._stopping.wait()

    def stop(self) -> None:
        """Stop every pod's processes (SIGTERM, short grace), then exit."""
        self._stopping.set()
        for worker in list(self.workers.values()):
            worker.request_stop(5)
        for worker in list(self.workers.values()):
            worker.finished.wait(10)
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
