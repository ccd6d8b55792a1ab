"""Kueue admits a queued FineTuneJob's pods as one group: the operator and Kueue (built from its
Go module, running beside the local control plane) against the real apiserver.

The Job's pods are watched from before the FineTuneJob exists, so "no pod while queued" is what
the apiserver said, not a look after a sleep. Jobs run the stand-in trainer (seconds, no ML).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from operatorkit import CRD, OperatorProcess, log_tail_after, started

from kubetune_devtools.pytest_plugin import Kubectl, apply, get_json, install_crd, wait_for

pytestmark = pytest.mark.integration

KUEUE_API = "kueue.x-k8s.io/v1beta2"
#: Millicores the ClusterQueue holds at first: one pod's worth of the two-pod job, half the
#: one-pod job's. Small, so the node's CPUs never decide, the queue's quota does.
FIRST_QUOTA = 100


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> None:
    install_crd(kubectl, CRD)


@pytest.fixture(scope="module")
def operator(
    crd: None, kueue: None, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    yield from started(
        OperatorProcess(kubeconfig_path, tmp_path_factory.mktemp("operator") / "log")
    )


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


@dataclass(frozen=True)
class PodEvent:
    at: float  # time.monotonic()
    type: str  # ADDED, MODIFIED, DELETED
    name: str
    phase: str


class PodWatch:
    """Every pod event in ``namespace`` from the moment it is made, in a thread."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client

        self.events: list[PodEvent] = []
        self.error: BaseException | None = None
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._stop = threading.Event()
        listed = self._core.list_namespaced_pod(namespace)
        assert listed.items == [], "the namespace must start without pods"
        self._resource_version: str = listed.metadata.resource_version
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        try:
            while not self._stop.is_set():
                # Short watches resumed from the last resourceVersion: no event is missed, and
                # the thread notices stop() within seconds.
                for event in watch.Watch().stream(
                    self._core.list_namespaced_pod,
                    self._namespace,
                    resource_version=self._resource_version,
                    timeout_seconds=2,
                ):
                    pod = event["object"]
                    self._resource_version = pod.metadata.resource_version
                    self.events.append(
                        PodEvent(
                            time.monotonic(),
                            event["type"],
                            pod.metadata.name,
                            pod.status.phase or "",
                        )
                    )
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def names(self) -> set[str]:
        return {event.name for event in self.events}

    def first_time_all_running(self, count: int) -> float | None:
        """When ``count`` pods first ran at the same time, by the watch's clock."""
        phases: dict[str, str] = {}
        for event in self.events:
            phases[event.name] = "" if event.type == "DELETED" else event.phase
            if sum(phase == "Running" for phase in phases.values()) >= count:
                return event.at
        return None


def kueue_queue(namespace: str, millicores: int) -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue of ``millicores`` CPU open to ``namespace`` alone, and
    a LocalQueue in it; all named after the namespace."""
    return [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": namespace}},
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": namespace},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu"],
                        "flavors": [
                            {
                                "name": namespace,
                                "resources": [{"name": "cpu", "nominalQuota": f"{millicores}m"}],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": "training", "namespace": namespace},
            "spec": {"clusterQueue": namespace},
        },
    ]


def make_queue(kubectl: Kubectl, namespace: str, millicores: int) -> str:
    """The LocalQueue ``training`` over a ClusterQueue of ``millicores`` CPU, once active."""
    items = kueue_queue(namespace, millicores)
    kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    wait_for(
        lambda: active(get_json(kubectl, "localqueue", "training", "-n", namespace)),
        60,
        "the LocalQueue to be active",
    )
    return "training"


@pytest.fixture
def cluster_scoped_cleanup(kubectl: Kubectl, namespace: str) -> Iterator[None]:
    """The test's ClusterQueue and ResourceFlavor (named after its namespace) go after it."""
    yield
    for kind in ("clusterqueue", "resourceflavor"):
        kubectl("delete", kind, namespace, "--wait=false", check=False)


def active(kueue_object: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Active" and c["status"] == "True"
        for c in kueue_object.get("status", {}).get("conditions") or []
    )


def ftj_status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_json(kubectl, "ftj", name, "-n", namespace).get("status") or {}
    return status


def workload(kubectl: Kubectl, namespace: str) -> dict[str, Any] | None:
    items: list[dict[str, Any]] = get_json(kubectl, "workloads.kueue.x-k8s.io", "-n", namespace)[
        "items"
    ]
    return items[0] if items else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    conditions = (obj or {}).get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def queued_job(queue: str, *, nodes: int, cpu: str, stand_in: str) -> dict[str, Any]:
    """FineTuneJob ``queued`` on ``queue``: ``nodes`` CPU pods of ``cpu`` each, running the
    stand-in trainer's ``stand_in`` plan (the test operator allows the env through podTemplate).
    The Validating phase's small CPU pod is not queued (it asks for no GPU quota); these tests
    are about the trainer's pods, so it is left out."""
    container = {"name": "trainer", "env": [{"name": "KUBETUNE_STAND_IN", "value": stand_in}]}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "queued"},
        "spec": {
            "model": {"uri": "org/model"},
            "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
            "output": {"uri": "s3://bucket/adapter"},
            "resources": {"gpus": 0, "nodes": nodes, "cpu": cpu, "shmSize": "64Mi"},
            "scheduling": {"queueName": queue},
            "validation": {"enabled": False},
            "podTemplate": {"spec": {"containers": [container]}},
        },
    }


@pytest.mark.parametrize(
    ("nodes", "cpu_per_pod"),
    [
        pytest.param(
            2,
            FIRST_QUOTA,
            id="two-pods",
        ),
        # The same admission for a one-pod job.
        pytest.param(1, 2 * FIRST_QUOTA, id="one-pod"),
    ],
)
def test_a_queued_job_starts_whole_only_when_its_queue_has_quota_for_all_its_pods(
    operator: OperatorProcess,
    kubectl: Kubectl,
    kube_api: Any,
    namespace: str,
    cluster_scoped_cleanup: None,
    nodes: int,
    cpu_per_pod: int,
) -> None:
    queue = make_queue(kubectl, namespace, FIRST_QUOTA)
    pods = PodWatch(kube_api, namespace)
    try:
        # Long enough that both pods are seen running at once.
        job = queued_job(queue, nodes=nodes, cpu=f"{cpu_per_pod}m", stand_in="sleep:8,exit:0")
        apply(kubectl, namespace, job)

        # Kueue looked at the whole group and said no: the quota is short of all its pods.
        def refused() -> dict[str, Any] | None:
            found = workload(kubectl, namespace)
            reserved = condition(found, "QuotaReserved")
            return found if reserved.get("status") == "False" and reserved.get("message") else None

        pending = wait_for(refused, 90, "Kueue to refuse the Workload for lack of quota")
        assert pending["spec"]["podSets"][0]["count"] == nodes
        assert "insufficient quota for cpu" in condition(pending, "QuotaReserved")["message"]
        status = wait_for(
            lambda: (s := ftj_status(kubectl, namespace, "queued")).get("phase") == "Queued" and s,
            60,
            "the FineTuneJob to show Queued",
        )
        assert condition({"status": status}, "Ready")["reason"] == "Queued"
        assert f"queue {queue}" in condition({"status": status}, "Ready")["message"]
        job_objects = get_json(kubectl, "jobs", "-n", namespace)["items"]
        assert [j["spec"]["suspend"] for j in job_objects] == [True]
        assert pods.names() == set(), f"a pod of the queued job exists: {pods.events}"

        # Quota for all pods frees: Kueue admits the Workload, the pods start together.
        kubectl(
            "patch", "clusterqueue", namespace, "--type=json", "-p",
            json.dumps([{
                "op": "replace",
                "path": "/spec/resourceGroups/0/flavors/0/resources/0/nominalQuota",
                "value": f"{nodes * cpu_per_pod}m",
            }]),
        )  # fmt: skip
        admitted = wait_for(
            lambda: (
                condition(w := workload(kubectl, namespace), "Admitted").get("status") == "True"
                and w
            ),
            60,
            "Kueue to admit the Workload",
        )
        usage = admitted["status"]["admission"]["podSetAssignments"][0]
        assert usage["count"] == nodes
        assert usage["resourceUsage"]["cpu"] == f"{nodes * cpu_per_pod}m"
        done = wait_for(
            lambda: (
                (s := ftj_status(kubectl, namespace, "queued")).get("phase")
                in ("Succeeded", "Failed")
                and s
            ),
            120,
            "the admitted FineTuneJob to finish",
        )
        assert done["phase"] == "Succeeded", done
    finally:
        pods.stop()
    assert pods.error is None, pods.error
    assert len(pods.names()) == nodes, pods.events
    assert pods.first_time_all_running(nodes) is not None, (
        f"the {nodes} pods never ran at the same time: {pods.events}"
    )


def test_suspending_a_queued_running_job_stops_it_through_kueue_until_resumed(
    operator: OperatorProcess,
    kubectl: Kubectl,
    kube_api: Any,
    namespace: str,
    cluster_scoped_cleanup: None,
) -> None:
    """Kueue owns a queued Job's suspend (it unsuspends an admitted Job suspended by anyone
    else): runPolicy.suspend deactivates the Workload, so Kueue itself stops the Job, releases
    the quota and keeps it stopped; clearing it queues the job again and it runs again."""
    queue = make_queue(kubectl, namespace, FIRST_QUOTA)
    pods = PodWatch(kube_api, namespace)
    try:
        job = queued_job(queue, nodes=1, cpu=f"{FIRST_QUOTA}m", stand_in="sleep:600")
        apply(kubectl, namespace, job)
        wait_for(
            lambda: ftj_status(kubectl, namespace, "queued").get("phase") == "Running",
            120,
            "the admitted job to run",
        )
        (first_pod,) = pods.names()

        def set_suspend(value: bool) -> None:
            patch = {"spec": {"runPolicy": {"suspend": value}}}
            kubectl("patch", "ftj", "queued", "-n", namespace, "--type=merge", "-p",
                    json.dumps(patch))  # fmt: skip

        set_suspend(True)
        evicted = wait_for(
            lambda: (
                condition(w := workload(kubectl, namespace), "Evicted").get("reason")
                == "Deactivated"
                and w
            ),
            60,
            "Kueue to evict the deactivated Workload",
        )
        assert evicted["spec"]["active"] is False
        # Kueue stopped the Job and gave the quota back; the pod is gone and nothing restarts it.
        wait_for(
            lambda: (
                condition(workload(kubectl, namespace), "QuotaReserved").get("status") == "False"
            ),
            60,
            "Kueue to release the quota",
        )
        wait_for(
            lambda: any(e.type == "DELETED" and e.name == first_pod for e in pods.events),
            120,
            "the running pod to be deleted",
        )
        status = wait_for(
            lambda: (
                (s := ftj_status(kubectl, namespace, "queued")).get("phase") == "Suspended" and s
            ),
            60,
            "the FineTuneJob to show Suspended",
        )
        assert condition({"status": status}, "Ready")["reason"] == "Suspended"
        (trainer_job,) = get_json(kubectl, "jobs", "-n", namespace)["items"]
        assert trainer_job["spec"]["suspend"] is True
        assert pods.names() == {first_pod}, f"a pod started while suspended: {pods.events}"

        # Resumed: the Workload is active again, Kueue admits it and a new pod runs.
        set_suspend(False)
        readmitted = wait_for(
            lambda: (
                condition(w := workload(kubectl, namespace), "Admitted").get("status") == "True"
                and w.get("spec", {}).get("active", True)
                and w
            ),
            90,
            "Kueue to admit the reactivated Workload",
        )
        assert readmitted["spec"]["active"] is True
        wait_for(
            lambda: (
                ftj_status(kubectl, namespace, "queued").get("phase") == "Running"
                and len(pods.names()) == 2
            ),
            120,
            "the resumed job to run a new pod",
        )
    finally:
        pods.stop()
    assert pods.error is None, pods.error
