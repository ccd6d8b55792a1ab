"""Multi-pod groups as JobSets (``KUBETUNE_GROUP_WORKLOAD=jobset``): the operator as a process and
JobSet's controller (built from its Go module, beside the local control plane, without its
webhooks) against the real apiserver.

A group is one JobSet the FineTuneJob owns; JobSet makes the headless Service and restarts the
whole group; the FineTuneJob's status reads the same as for the operator's own Indexed Jobs.
Without JobSet's CRD the operator falls back to the Indexed Job and says so. Lifecycle jobs run
the stand-in trainer (seconds, no ML); one job trains the tiny model for real in two pods.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operatorkit import CRD, OperatorProcess, log_tail_after, started
from test_kueue import (
    FIRST_QUOTA,
    PodWatch,
    cluster_scoped_cleanup,  # noqa: F401 - a fixture, used here too
    make_queue,
    workload,
)
from test_kueue import condition as kueue_condition
from test_operator_integration import (
    CLAIM,
    apply,
    condition,
    event_reasons,
    finetunejob,
    ftj_status,
    pods_of,
    sha256_of,
    sleeper_spec,
    tiny_training_spec,
    wait_phase,
    wait_ready_reason,
    wait_status,
    work_claim,
)

from kubetune_devtools.pytest_plugin import ClusterHandle, Kubectl, get_json, install_crd, wait_for

pytestmark = pytest.mark.integration

JOBSET_CRD = "jobsets.jobset.x-k8s.io"
RANK = "batch.kubernetes.io/job-completion-index"


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> None:
    install_crd(kubectl, CRD)


def jobset_operator(kubeconfig: Path, log: Path, *args: str, **env: str) -> OperatorProcess:
    return OperatorProcess(kubeconfig, log, args, {"KUBETUNE_GROUP_WORKLOAD": "jobset", **env})


@pytest.fixture(scope="module")
def operator(
    crd: None, jobset: None, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    yield from started(
        jobset_operator(kubeconfig_path, tmp_path_factory.mktemp("operator") / "log")
    )


@pytest.fixture
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


def group_spec(plan: str, backoff_limit: int, *, suspend: bool = False) -> dict[str, Any]:
    """A two-pod group of stand-in trainers following ``plan`` (``@N``: node rank N only)."""
    spec = sleeper_spec(0, resources={"gpus": 0, "nodes": 2, "shmSize": "64Mi"},
                        runPolicy={"backoffLimit": backoff_limit, "suspend": suspend},
                        validation={"enabled": False})  # fmt: skip
    spec["podTemplate"]["spec"]["containers"][0]["env"][0]["value"] = plan
    return spec


def owner_uid(obj: dict[str, Any]) -> str | None:
    return next(
        (o["uid"] for o in obj["metadata"].get("ownerReferences") or [] if o.get("controller")),
        None,
    )


def the_jobset(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    (jobset,) = get_json(kubectl, "jobsets.jobset.x-k8s.io", "-n", namespace)["items"]
    return dict(jobset)


def live_ranks(kubectl: Kubectl, namespace: str, name: str) -> dict[int, dict[str, Any]]:
    return {
        int(p["metadata"]["labels"][RANK]): p
        for p in pods_of(kubectl, namespace, name)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    }


def both_running(kubectl: Kubectl, namespace: str, name: str) -> dict[int, dict[str, Any]]:
    ranks: dict[int, dict[str, Any]] = wait_for(
        lambda: (r := live_ranks(kubectl, namespace, name)) and len(r) == 2 and r,
        60,
        "both ranks running",
    )
    return ranks


# --- without JobSet's CRD (first: it takes the CRD away for a moment, if it is there) ---------


@pytest.fixture
def jobset_crd_absent(local_cluster: ClusterHandle, kubectl: Kubectl, crd: None) -> Iterator[None]:
    """No JobSet CRD while the test runs (a session that installed it gets it back after, with
    its controller)."""
    local = local_cluster.local()
    present = kubectl("get", "crd", JOBSET_CRD, check=False).returncode == 0
    if present:
        local.process("jobset").stop()
        kubectl("delete", "crd", JOBSET_CRD, "--wait=true", timeout=120)
    yield
    if present:
        local.start_jobset()


def test_without_jobsets_crd_a_group_runs_as_an_indexed_job_and_the_operator_says_why(
    jobset_crd_absent: None,
    kubectl: Kubectl,
    kubeconfig_path: Path,
    namespace: str,
    tmp_path: Path,
) -> None:
    # Its own operator (started without the CRD), on this namespace and its own Lease.
    fallback = jobset_operator(kubeconfig_path, tmp_path / "log", "--namespace", namespace,
                               KUBETUNE_LEASE_NAME=f"kubetune-{namespace}")  # fmt: skip
    fallback.start()
    try:
        apply(kubectl, namespace, finetunejob("group", group_spec("sleep:1,exit:0", 0)))
        final = wait_phase(kubectl, namespace, "group", {"Succeeded", "Failed"}, 120)
        assert final["phase"] == "Succeeded", final
        (job,) = get_json(kubectl, "jobs", "-n", namespace)["items"]
        ftj_uid = get_json(kubectl, "ftj", "group", "-n", namespace)["metadata"]["uid"]
        assert (job["spec"]["completionMode"], owner_uid(job)) == ("Indexed", ftj_uid)
        service = get_json(kubectl, "service", job["spec"]["template"]["spec"]["subdomain"],
                           "-n", namespace)  # fmt: skip
        assert owner_uid(service) == ftj_uid
        events = get_json(kubectl, "events", "-n", namespace, "--field-selector",
                          "involvedObject.name=group,reason=JobSetUnavailable")["items"]  # fmt: skip
        (event,) = events
        assert event["type"] == "Warning"
        assert JOBSET_CRD in event["message"] and "Indexed Job" in event["message"]
        log = fallback.log_path.read_text()
        assert f"JobSet's CRD ({JOBSET_CRD}) is not installed" in log
    finally:
        fallback.stop()
        print(f"--- fallback operator log (tail) ---\n{fallback.log_tail()}")


# --- with JobSet ------------------------------------------------------------------------------


def until_finished(
    kubectl: Kubectl, namespace: str, name: str, stall: float = 180
) -> dict[str, Any]:
    """The FineTuneJob's status once Succeeded or Failed; fails only when neither its phase, its
    reason nor its progress moved for ``stall`` seconds (a loaded machine trains slowly)."""
    last: tuple[Any, ...] = ()
    moved = time.monotonic()
    while True:
        status = ftj_status(kubectl, namespace, name)
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        seen = (status.get("phase"), condition(status, "Ready").get("reason"),
                (status.get("progress") or {}).get("step"))  # fmt: skip
        if seen != last:
            last, moved = seen, time.monotonic()
        assert time.monotonic() - moved < stall, f"{name} stalled for {stall:.0f}s at {last}"
        time.sleep(1)


@pytest.mark.usefixtures("_operator_log")
def test_a_two_pod_group_trains_through_one_jobset_that_the_finetunejob_owns(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, tiny_assets: Path
) -> None:
    volume = work_claim(kubectl, namespace)
    shutil.copytree(tiny_assets / "model", volume / "model")
    shutil.copytree(tiny_assets / "data", volume / "data")
    spec = tiny_training_spec(f"pvc://{CLAIM}/data/reverse-prompt-completion.jsonl", maxSteps=6)
    spec["resources"]["nodes"] = 2
    apply(kubectl, namespace, finetunejob("pair", spec))

    status = until_finished(kubectl, namespace, "pair")
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert (status["attempts"], status["worldSize"]) == (1, 2)
    adapter = status["result"]["adapter"]
    weights = volume / adapter["uri"].removeprefix(f"pvc://{CLAIM}/") / "adapter_model.safetensors"
    assert adapter["sha256"] == sha256_of(weights)

    # One JobSet, the FineTuneJob's; its Job (JobSet's, not an Indexed Job of the operator's)
    # ran both ranks, which met at rank 0 through JobSet's headless Service.
    ftj_uid = get_json(kubectl, "ftj", "pair", "-n", namespace)["metadata"]["uid"]
    jobset = the_jobset(kubectl, namespace)
    assert owner_uid(jobset) == ftj_uid
    assert condition(jobset["status"], "Completed")["status"] == "True"
    jobs = get_json(kubectl, "jobs", "-n", namespace)["items"]
    trainer_jobs = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    assert [owner_uid(j) for j in trainer_jobs] == [jobset["metadata"]["uid"]]
    assert status["jobName"] == trainer_jobs[0]["metadata"]["name"]
    services = get_json(kubectl, "services", "-n", namespace)["items"]
    assert [owner_uid(s) for s in services] == [jobset["metadata"]["uid"]]
    pods = pods_of(kubectl, namespace, "pair")
    assert sorted(p["metadata"]["labels"][RANK] for p in pods) == ["0", "1"]
    endpoint = f"{jobset['metadata']['name']}-node-0-0.{jobset['metadata']['name']}:29400"
    for pod in pods:
        assert pod["status"]["phase"] == "Succeeded"
        log = kubectl("logs", pod["metadata"]["name"], "-n", namespace).stdout
        assert f"(2 pod(s), gloo, c10d at {endpoint} rendezvous)" in log
        (trainer,) = pod["status"]["containerStatuses"]
        assert (
            json.loads(trainer["state"]["terminated"]["message"])["adapter"]["sha256"]
            == (adapter["sha256"])
        )
    rank_zero = next(p for p in pods if p["metadata"]["labels"][RANK] == "0")
    assert status["podName"] == rank_zero["metadata"]["name"]
    wide = kubectl("get", "ftj", "pair", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[1][wide[0].index("RANKS") :].split()[0] == "2"


@pytest.mark.usefixtures("_operator_log")
def test_a_lost_pod_restarts_the_whole_jobset_and_the_last_attempt_lost_fails_the_job(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("group", group_spec("sleep:600", backoff_limit=1)))
    both = "2 of 2 pods"
    first = wait_status(kubectl, namespace, "group",
                        lambda s: both in condition(s, "Ready").get("message", ""), 120,
                        "both pods running")  # fmt: skip
    ranks = both_running(kubectl, namespace, "group")
    assert (first["attempts"], first["podName"]) == (1, ranks[0]["metadata"]["name"])
    job_uid = ranks[0]["metadata"]["labels"]["batch.kubernetes.io/controller-uid"]

    # Rank 1's pod is lost: JobSet makes the group's Job again, both ranks with it.
    kubectl("delete", "pod", ranks[1]["metadata"]["name"], "-n", namespace, "--wait=false")
    retrying = wait_ready_reason(kubectl, namespace, "group", "Retrying", 60)
    assert "group attempt 1 failed" in condition(retrying, "Ready")["message"]
    second = wait_status(kubectl, namespace, "group",
                         lambda s: s.get("attempts") == 2 and both in condition(s, "Ready").get(
                             "message", ""), 120, "the second attempt running")  # fmt: skip
    new_ranks = both_running(kubectl, namespace, "group")
    assert {p["metadata"]["name"] for p in new_ranks.values()}.isdisjoint(
        p["metadata"]["name"] for p in ranks.values()
    ), "the surviving rank must restart with the group"
    assert new_ranks[0]["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] != job_uid
    assert second["phase"] == "Running"
    assert the_jobset(kubectl, namespace)["status"]["restarts"] == 1

    # backoffLimit 1 (maxRestarts 1): the second lost pod fails the JobSet, and the job.
    kubectl("delete", "pod", new_ranks[0]["metadata"]["name"], "-n", namespace, "--wait=false")
    final = wait_phase(kubectl, namespace, "group", {"Failed", "Succeeded"}, 120)
    assert (final["phase"], final["attempts"]) == ("Failed", 2)
    wait_for(lambda: condition(the_jobset(kubectl, namespace)["status"], "Failed").get("status") == "True",
             60, "the JobSet to fail")  # fmt: skip
    assert (
        condition(the_jobset(kubectl, namespace)["status"], "Failed")["reason"]
        == "ReachedMaxRestarts"
    )
    assert "Retrying" in event_reasons(kubectl, namespace, "group")


@pytest.mark.usefixtures("_operator_log")
def test_a_non_retriable_exit_on_one_rank_fails_the_jobset_at_once_naming_that_rank(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    plan = "sleep:600@0,sleep:2@1,exit:3@1"
    apply(kubectl, namespace, finetunejob("bad-rank", group_spec(plan, backoff_limit=3)))
    status = wait_phase(kubectl, namespace, "bad-rank", {"Failed", "Succeeded"}, 120)
    failed = condition(status, "Failed")
    assert (status["phase"], failed["reason"], status["attempts"]) == ("Failed", "DatasetError", 1)
    assert failed["message"].startswith("node rank 1: ")
    wait_for(lambda: condition(the_jobset(kubectl, namespace)["status"], "Failed").get("status") == "True",
             60, "the JobSet to fail")  # fmt: skip
    jobset = the_jobset(kubectl, namespace)
    assert condition(jobset["status"], "Failed")["reason"] == "FailJobSetFailurePolicyAction"
    assert jobset["status"]["restarts"] == 0


@pytest.mark.usefixtures("_operator_log")
def test_a_suspended_group_suspends_its_jobset_resumes_it_and_goes_with_its_finetunejob(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = group_spec("sleep:1,exit:0", 0, suspend=True)
    apply(kubectl, namespace, finetunejob("paused", spec))
    wait_phase(kubectl, namespace, "paused", {"Suspended"}, 60)
    assert the_jobset(kubectl, namespace)["spec"]["suspend"] is True
    assert pods_of(kubectl, namespace, "paused") == []

    kubectl("patch", "ftj", "paused", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}')  # fmt: skip
    final = wait_phase(kubectl, namespace, "paused", {"Succeeded", "Failed"}, 120)
    assert final["phase"] == "Succeeded", final
    assert the_jobset(kubectl, namespace)["spec"]["suspend"] is False

    # Deleting the FineTuneJob deletes its JobSet, and JobSet's controller the rest.
    kubectl("delete", "ftj", "paused", "-n", namespace, "--wait=false")

    def gone() -> bool:
        kinds = "jobsets.jobset.x-k8s.io,jobs,services,pods,configmaps"
        left = get_json(kubectl, kinds, "-n", namespace)["items"]
        return not [o for o in left if o["metadata"]["name"] != "kube-root-ca.crt"]

    wait_for(gone, 60, "the JobSet, its Job, Service and pods, and the ConfigMap to go")


@pytest.mark.usefixtures("_operator_log", "kueue", "cluster_scoped_cleanup")
def test_kueue_admits_a_queued_jobset_whole_only_when_its_queue_has_quota_for_both_pods(
    operator: OperatorProcess, kubectl: Kubectl, kube_api: Any, namespace: str
) -> None:
    queue = make_queue(kubectl, namespace, FIRST_QUOTA)
    pods = PodWatch(kube_api, namespace)
    try:
        spec = group_spec("sleep:5,exit:0", 0)
        spec["resources"]["cpu"] = f"{FIRST_QUOTA}m"
        spec["scheduling"] = {"queueName": queue}
        apply(kubectl, namespace, finetunejob("queued", spec))

        # Kueue looked at the JobSet's two pods and said no: the quota holds one.
        def refused() -> dict[str, Any] | None:
            found = workload(kubectl, namespace)
            reserved = kueue_condition(found, "QuotaReserved")
            return found if reserved.get("status") == "False" and reserved.get("message") else None

        pending = wait_for(refused, 90, "Kueue to refuse the JobSet's Workload for lack of quota")
        assert pending["metadata"]["ownerReferences"][0]["kind"] == "JobSet"
        assert pending["spec"]["podSets"][0]["count"] == 2
        wait_phase(kubectl, namespace, "queued", {"Queued"}, 60)
        assert the_jobset(kubectl, namespace)["spec"]["suspend"] is True
        assert pods.names() == set(), f"a pod of the queued job exists: {pods.events}"

        kubectl("patch", "clusterqueue", namespace, "--type=json", "-p", json.dumps([{
            "op": "replace", "path": "/spec/resourceGroups/0/flavors/0/resources/0/nominalQuota",
            "value": f"{2 * FIRST_QUOTA}m"}]))  # fmt: skip
        done = wait_phase(kubectl, namespace, "queued", {"Succeeded", "Failed"}, 120)
        assert done["phase"] == "Succeeded", done
        admitted = workload(kubectl, namespace)
        assert kueue_condition(admitted, "Admitted")["status"] == "True"
        assert admitted["status"]["admission"]["podSetAssignments"][0]["count"] == 2
    finally:
        pods.stop()
    assert pods.error is None, pods.error
    assert len(pods.names()) == 2, pods.events
    assert pods.first_time_all_running(2) is not None, f"never both running: {pods.events}"
