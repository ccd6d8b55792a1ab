"""Faults the operator survives, on the real local control plane: the apiserver or etcd
restarted mid-run, the operator SIGKILLed while it creates children, a FineTuneJob deleted while
its Job is made, the node lost under a running pod, every watch gone quiet at once.

Jobs run the stand-in trainer (seconds) or stay suspended (nothing runs), so each test costs
seconds plus the restart it provokes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operatorkit import CRD, OperatorProcess, log_tail_after, started
from stallproxy import StallingProxy
from test_operator_ha import leader_of
from test_operator_integration import (
    apply,
    finetunejob,
    jobs_of,
    sleeper_spec,
    wait_phase,
)

from kubetune.local import components
from kubetune.local.certs import ensure_pki
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.controlplane import LocalCluster
from kubetune_devtools.pytest_plugin import (
    ClusterHandle,
    Kubectl,
    get_json,
    session_node,
    trainer_test_image_reference,
    wait_for,
)

pytestmark = pytest.mark.integration

#: A job's children: no ServiceAccount, Role or RoleBinding is made per job.
#: What each job owns (its namespace's one trainer NetworkPolicy is owned by none).
CHILD_KINDS = ("configmaps", "jobs")


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    yield from started(
        OperatorProcess(
            kubeconfig_path,
            tmp_path_factory.mktemp("operator") / "log",
            env={"KUBETUNE_LEASE_DURATION_SECONDS": "4", "KUBETUNE_LEASE_RENEW_SECONDS": "1"},
        )
    )


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


@pytest.fixture
def cluster(local_cluster: ClusterHandle) -> LocalCluster:
    return local_cluster.local()


def restart(cluster: LocalCluster, name: str, down_seconds: float = 2.0) -> None:
    """Stop one control-plane process, leave it down a moment, start it again, wait till ready."""
    info = ClusterInfo.load(cluster.layout)
    if name == "etcd":
        argv = components.etcd_argv(info, cluster.layout)
    else:
        argv = components.apiserver_argv(info, cluster.layout, ensure_pki(cluster.layout.pki))
    process = cluster.process(name)
    process.stop()
    time.sleep(down_seconds)
    process.start(argv)
    wait_for(cluster.ready, 120, f"the cluster to be ready after restarting {name}")


def children(kubectl: Kubectl, namespace: str, kind: str) -> list[dict[str, object]]:
    items: list[dict[str, object]] = get_json(
        kubectl, kind, "-n", namespace, "-l", "app.kubernetes.io/managed-by=kubetune-operator"
    )["items"]
    return items


def apply_suspended(
    kubectl: Kubectl, namespace: str, name: str, *, validation: bool = True
) -> None:
    """Apply a suspended stand-in FineTuneJob ``name``: the operator makes its children, and
    nothing runs (``validation=False``: the trainer's Job at once, no Validating phase)."""
    spec = sleeper_spec(1, runPolicy={"suspend": True}, validation={"enabled": validation})
    apply(kubectl, namespace, finetunejob(name, spec))


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_a_running_job_completes_though_the_control_plane_restarts_mid_run(
    operator: OperatorProcess,
    cluster: LocalCluster,
    kubectl: Kubectl,
    namespace: str,
    component: str,
) -> None:
    # The trainer outlives the restart: this test is about the operator's watches, not about a
    # pod that ends while the apiserver is down.
    apply(kubectl, namespace, finetunejob("steady", sleeper_spec(20)))
    wait_phase(kubectl, namespace, "steady", {"Running"}, 90)
    (job,) = jobs_of(kubectl, namespace)

    restart(cluster, component)

    status = wait_phase(kubectl, namespace, "steady", {"Succeeded", "Failed"}, 120)
    assert status["phase"] == "Succeeded"
    assert [j["metadata"]["uid"] for j in jobs_of(kubectl, namespace)] == [job["metadata"]["uid"]]


def test_operator_killed_while_creating_children_leaves_no_orphan_and_no_duplicate(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    names = [f"burst-{i}" for i in range(12)]
    for name in names:
        apply_suspended(kubectl, namespace, name)
    # Kill it as soon as the first children exist: the others are mid-creation or not started.
    wait_for(lambda: children(kubectl, namespace, "configmaps"), 60, "the first child")
    operator.kill()
    operator.start()

    for name in names:
        wait_phase(kubectl, namespace, name, {"Suspended"}, 120)
    owners = {f["metadata"]["uid"] for f in get_json(kubectl, "ftj", "-n", namespace)["items"]}
    for kind in CHILD_KINDS:
        items = children(kubectl, namespace, kind)
        assert len(items) == len(names), kind
        for item in items:
            refs = item["metadata"]["ownerReferences"]  # type: ignore[index]
            assert [r["uid"] for r in refs if r.get("controller")] in [[uid] for uid in owners]
    assert shared_policy(kubectl, namespace)


def shared_policy(kubectl: Kubectl, namespace: str) -> bool:
    """The namespace has one NetworkPolicy of kubetune's, its shared trainer policy, and no job
    owns it."""
    (policy,) = children(kubectl, namespace, "networkpolicies")
    meta: dict[str, Any] = policy["metadata"]  # type: ignore[assignment]
    return meta["name"] == "kubetune-trainers" and not meta.get("ownerReferences")


def test_a_finetunejob_deleted_while_its_job_is_created_leaves_nothing_behind(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    count = 8
    for i in range(count):
        apply_suspended(kubectl, namespace, f"gone-{i}")
        kubectl("delete", "ftj", f"gone-{i}", "-n", namespace, "--wait=false")
    for kind in CHILD_KINDS:
        wait_for(
            lambda kind=kind: not children(kubectl, namespace, kind),
            90,
            f"every {kind} of the deleted jobs to be collected",
        )
    # The operator is still well: a new job still gets its Job.
    apply_suspended(kubectl, namespace, "after")
    wait_phase(kubectl, namespace, "after", {"Suspended"}, 60)


def test_a_pod_lost_with_its_node_is_replaced_and_the_job_completes(
    operator: OperatorProcess,
    cluster: LocalCluster,
    kubectl: Kubectl,
    namespace: str,
    real_node: str,
) -> None:
    apply(kubectl, namespace, finetunejob("node-lost", sleeper_spec(5)))
    first = wait_phase(kubectl, namespace, "node-lost", {"Running"}, 90)

    # The node goes, its pods' processes with it, and its Node object: the pod garbage
    # collector fails and removes the pods bound to a node that no longer exists.
    cluster.stop_real_node(real_node)
    kubectl("delete", "node", real_node)
    wait_for(
        lambda: (
            kubectl("get", "pod", first["podName"], "-n", namespace, check=False).returncode != 0
        ),
        180,
        "the lost node's pod to be collected",
    )
    # The node comes back (empty: its containerd root may be another), and the replacement pod
    # runs there.
    cluster.start_real_node(session_node())
    cluster.import_images(real_node, [trainer_test_image_reference()])

    status = wait_phase(kubectl, namespace, "node-lost", {"Succeeded", "Failed"}, 180)
    assert status["phase"] == "Succeeded"
    assert status["attempts"] >= 2
    assert status["podName"] != first["podName"]
    assert len(jobs_of(kubectl, namespace)) == 1


#: What the quiet-watch test sets: a watch silent this long is dead; a request this slow fails.
QUIET_INACTIVITY_SECONDS = 6
QUIET_API_TIMEOUT_SECONDS = 5


def test_watches_that_go_quiet_are_started_again_and_a_new_job_still_gets_its_job(
    operator: OperatorProcess,
    local_cluster: ClusterHandle,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Every connection between the operator and the apiserver goes silent at once, without
    being closed (a dropped NAT entry, a stuck proxy): the operator must notice its watches bring
    nothing (kopf's inactivity timeout, bookmarks), start them again and act on what was created
    meanwhile."""
    info = ClusterInfo.load(local_cluster.local().layout)
    operator.stop()  # this test's operator, behind the proxy, is the only one acting
    try:
        with StallingProxy(("127.0.0.1", info.apiserver_port)) as proxy:
            quiet = OperatorProcess(
                proxy.kubeconfig(local_cluster.kubeconfig, tmp_path / "kubeconfig"),
                tmp_path / "operator.log",
                cluster_home=local_cluster.local().layout.home,
                env={
                    "KUBETUNE_WATCH_INACTIVITY_SECONDS": str(QUIET_INACTIVITY_SECONDS),
                    "KUBETUNE_API_TIMEOUT_SECONDS": str(QUIET_API_TIMEOUT_SECONDS),
                    "KUBETUNE_LEASE_NAME": "kubetune-quiet-watch",
                },
            )
            quiet.start()
            try:
                wait_for(lambda: leader_of(quiet), 120, "the operator to take its Lease")
                started_at = time.monotonic()
                apply_suspended(kubectl, namespace, "before", validation=False)
                wait_phase(kubectl, namespace, "before", {"Suspended"}, 120)
                # How long a new job takes to get its Job on this machine, now.
                observed = time.monotonic() - started_at

                stalled = proxy.stall()
                assert stalled >= 3  # at least the FineTuneJob, Job and Pod watches
                stalled_at = time.monotonic()
                apply_suspended(kubectl, namespace, "during", validation=False)
                # The silence noticed, a request or two on dead kept-alive connections timed out
                # and retried (5 s), then as fast as before. Well under kopf's default 70 s.
                retry = QUIET_API_TIMEOUT_SECONDS + 5
                deadline = QUIET_INACTIVITY_SECONDS + 2 * retry + 3 * observed
                status = wait_phase(kubectl, namespace, "during", {"Suspended"}, deadline)
                took = time.monotonic() - stalled_at
                print(f"a job created in the silence got its Job after {took:.1f}s")
                assert status["jobName"]
                # The operator hung up on its silent watches itself (the server never closed
                # them: its watch timeout is minutes away, and the proxy drops its bytes); the
                # new job may get its Job before the last of them has gone quiet long enough.
                wait_for(
                    lambda: proxy.closed_by_client_while_stalled >= 3,
                    QUIET_INACTIVITY_SECONDS + 2 * retry,
                    "the operator to hang up on its silent watches",
                )
                owners = [
                    j["metadata"]["ownerReferences"][0]["name"] for j in jobs_of(kubectl, namespace)
                ]
                assert sorted(owners) == ["before", "during"]
            finally:
                print(f"--- quiet-watch operator log (tail) ---\n{quiet.log_tail()}")
                quiet.stop()
    finally:
        operator.start()
