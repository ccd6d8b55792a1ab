"""The node's side of the Node object, as a kubelet keeps it: registration (capacity, labels,
taints, addresses, the kubelet port), then heartbeats — the Lease in ``kube-node-lease``
renewed every 10 s and the conditions reported every 20 s — that keep the node Ready."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.timestamps import rfc3339
from kubetune.local.gpus import GPU_RESOURCE
from kubetune.local.node_config import NodeConfig
from kubetune.local.rest import JSON, STRATEGIC_MERGE_PATCH, ApiError, Rest, path_for

log = logging.getLogger(__name__)

LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10
STATUS_REPORT_SECONDS = 20


def _host_memory() -> str:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1])}Ki"
    return "8Gi"


def node_conditions() -> list[JSON]:
    """A healthy node's conditions, stamped now."""
    stamp = rfc3339()
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


@dataclass(frozen=True)
class NodeHeartbeat:
    """Registers one Node and keeps it Ready while the agent runs."""

    rest: Rest
    config: NodeConfig
    host_ip: str
    kubelet_port: int
    storage: Path  # whose filesystem is the node's ephemeral storage

    def node_object(self) -> JSON:
        capacity = {
            "cpu": self.config.cpu or str(os.cpu_count() or 1),
            "memory": self.config.memory or _host_memory(),
            "pods": str(self.config.max_pods),
            "ephemeral-storage": f"{shutil.disk_usage(self.storage).total // 1024}Ki",
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
                "conditions": node_conditions(),
                "addresses": [
                    {"type": "InternalIP", "address": self.host_ip},
                    {"type": "Hostname", "address": self.config.name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
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

    def register(self) -> None:
        node = self.node_object()
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
        self._patch_status(node["status"])

    def _patch_status(self, status: JSON) -> None:
        self.rest.patch(
            path_for(None, "nodes", self.config.name, "status"),
            {"status": status},
            STRATEGIC_MERGE_PATCH,
        )

    def renew_lease(self) -> None:
        name = self.config.name
        renew = rfc3339(micros=True)
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

    def beat_until(self, stopping: threading.Event) -> None:
        """Renew the Lease and report conditions until ``stopping`` is set."""
        last_status = 0.0
        while not stopping.is_set():
            try:
                self.renew_lease()
                if time.monotonic() - last_status >= STATUS_REPORT_SECONDS:
                    self._patch_status(
                        {
                            "conditions": node_conditions(),
                            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
                        }
                    )
                    last_status = time.monotonic()
            except Exception as error:  # keep beating through apiserver hiccups
                if isinstance(error, ApiError) and error.status == 404:
                    log.warning("node %s was deleted; registering again", self.config.name)
                    self._register_again()
                else:
                    log.warning("heartbeat failed: %s", error)
            stopping.wait(LEASE_RENEW_SECONDS)

    def _register_again(self) -> None:
        try:
            self.register()
        except Exception as error:
            log.warning("%s", error)
