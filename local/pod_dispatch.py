"""The pods bound to one node: watched (``fieldSelector=spec.nodeName=<node>``) and handed to a
PodWorker each, stopped when they are deleted, and removed (grace period 0) once nothing of
them runs, as a kubelet does."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from kubetune.local.gpus import GpuAllocator, gpu_device_paths
from kubetune.local.images import ImageStore
from kubetune.local.pod_dns import PodDns, pod_address
from kubetune.local.pod_worker import NodeContext, PodWorker
from kubetune.local.rest import JSON, STRATEGIC_MERGE_PATCH, ApiError, Rest, path_for

log = logging.getLogger(__name__)


class PodDispatcher:
    """Runs the pods the scheduler binds to ``node_name``, one PodWorker each."""

    def __init__(
        self,
        rest: Rest,
        *,
        node_name: str,
        host_ip: str,
        node_dir: Path,
        memory_dir: Path,
        gpus: GpuAllocator,
        base_env: Callable[[], Mapping[str, str]],
        images: ImageStore,
        image_env: Callable[[], Mapping[str, str]],
    ) -> None:
        self.rest = rest
        self.node_name = node_name
        self.host_ip = host_ip
        self.pods_dir = node_dir / "pods"
        self.memory_dir = memory_dir
        self.gpus = gpus
        self.base_env = base_env
        self.images = images
        self.image_env = image_env
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self.dns = PodDns(rest)
        self._addresses: dict[str, str] = {}  # pod uid -> its address (status.podIP)
        self._by_name: dict[tuple[str, str], PodWorker] = {}
        self._lock = threading.Lock()
        self._deleting: set[str] = set()  # uids whose deletion the node must finish

    def find_worker(self, namespace: str, name: str) -> PodWorker | None:
        with self._lock:
            return self._by_name.get((namespace, name))

    def _start(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        env_extra = self.gpus.allocate(uid, pod)
        context = NodeContext(
            node_name=self.node_name,
            host_ip=self.host_ip,
            pods_dir=self.pods_dir,
            base_env=self.base_env(),
            memory_dir=self.memory_dir,
            images=self.images,
            image_env=self.image_env(),
            device_paths=gpu_device_paths(),
        )
        address = pod_address(uid, self._addresses.values())
        self._addresses[uid] = address
        worker = PodWorker(
            self.rest,
            context,
            pod,
            env_extra,
            on_finished=self._finished,
            address=address,
            dns=self.dns,
        )
        self.workers[uid] = worker
        self._by_name[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = worker
        log.info("starting pod %s/%s", pod["metadata"]["namespace"], pod["metadata"]["name"])
        worker.start()

    def _finished(self, worker: PodWorker) -> None:
        self.gpus.release(worker.uid)
        self.dns.remove(worker.uid)
        with self._lock:
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
            self._addresses.pop(uid, None)
        self.dns.remove(uid)
        shutil.rmtree(self.pods_dir / uid, ignore_errors=True)
        shutil.rmtree(self.memory_dir / uid, ignore_errors=True)

    def _report_orphan(self, namespace: str, name: str) -> None:
        """A pod left Running by an earlier agent, whose processes died with it
        (--die-with-parent): report that rather than run it a second time."""
        try:
            self.rest.patch(
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
        except Exception as error:
            log.warning("%s", error)

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
            self._report_orphan(namespace, name)
            return
        with self._lock:
            self._start(pod)

    def watch_until(self, stopping: threading.Event) -> None:
        """List and watch the node's pods, syncing each, until ``stopping`` is set."""
        selector = f"spec.nodeName={self.node_name}"
        while not stopping.is_set():
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
                    if stopping.is_set():
                        return
                    kind, obj = event["type"], event["object"]
                    if kind == "BOOKMARK":
                        continue
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: list again
                    self.sync(kind, obj)
            except Exception as error:
                if not stopping.is_set():
                    log.warning("pod watch: %s; listing again", error)
                    time.sleep(1)

    def stop_all(self, grace_seconds: float, wait_seconds: float) -> None:
        """Stop every pod's processes (SIGTERM, then SIGKILL after ``grace_seconds``)."""
        for worker in list(self.workers.values()):
            worker.request_stop(grace_seconds)
        for worker in list(self.workers.values()):
            worker.finished.wait(wait_seconds)
