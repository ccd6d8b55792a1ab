"""The main job end to end, as a user meets it: kubetune installed with helm on the real local
cluster, FineTuneJobs applied with kubectl, real QLoRA on the CPU, and what comes back on the
resource. Lifecycle paths the operator suite already drives with its own process (missing
dataset, suspend, operator restart) are driven here through the chart-installed operator."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2ekit import (
    CLAIM,
    MLFLOW_SERVICE,
    apply,
    ftj_status,
    operator_pods,
    run_pod,
    seed_demo_claim,
    tiny_job,
    wait_observing,
    wait_phase,
)

from kubetune_devtools.installs import project_version
from kubetune_devtools.pytest_plugin import Kubectl, get_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("kubetune_release")]

REPO = Path(__file__).resolve().parents[2]


def trainer_jobs(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, object]]:
    """``name``'s trainer Jobs (not its Validating phase's)."""
    selector = f"kubetune.io/job={name},app.kubernetes.io/component=trainer"
    items: list[dict[str, object]] = get_json(kubectl, "jobs", "-n", namespace, "-l", selector)[
        "items"
    ]
    return items


def ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    conditions = pod["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def gpu_requests(pod: dict[str, Any]) -> list[str]:
    """The GPU amounts a pod's containers ask for."""
    return [
        str(amounts["nvidia.com/gpu"])
        for container in pod["spec"]["containers"]
        for amounts in (container.get("resources") or {}).values()
        if "nvidia.com/gpu" in amounts
    ]


def event_reasons(kubectl: Kubectl, namespace: str, name: str) -> list[str]:
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
    events = get_json(kubectl, "events", "-n", namespace, "--field-selector", selector)["items"]
    # Within a second, by eventTime (the operator's Events carry it to the microsecond).
    ordered = sorted(events, key=lambda e: (e["lastTimestamp"], e.get("eventTime") or ""))
    return [str(e.get("reason")) for e in ordered]


def test_tiny_job_trains_from_the_images_reports_its_adapter_and_tracks_it_in_mlflow(
    kubectl: Kubectl, namespace: str, kubeconfig_path: Path, real_node: str, mlflow: Any
) -> None:
    seed_demo_claim(kubectl, namespace)
    # The MLflow credentials come from a Secret; the server (basic auth) takes the run only
    # with them, so a run there shows they reached the trainer.
    kubectl("create", "secret", "generic", "mlflow-auth", "-n", namespace,
            f"--from-literal=username={mlflow.username}",
            f"--from-literal=password={mlflow.password}")  # fmt: skip
    job = tiny_job()
    job["spec"]["tracking"] = {
        "mlflow": {
            "trackingUri": f"http://{MLFLOW_SERVICE}",
            "experimentName": f"e2e-{namespace}",
            "usernameSecretRef": {"name": "mlflow-auth", "key": "username"},
            "passwordSecretRef": {"name": "mlflow-auth", "key": "password"},
        }
    }
    apply(kubectl, namespace, job)

    # `kubetune watch` follows the job to its end; the test's own wait bounds it by the job's
    # observed pace (e2ekit.wait_observing), not by a constant.
    watcher = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "kubetune"), "watch", "tiny-reverse", "-n", namespace,
         "--kubeconfig", str(kubeconfig_path), "--interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_phase(kubectl, namespace, "tiny-reverse", {"Succeeded", "Failed"}, 240)
        out, err = watcher.communicate(timeout=60)  # it polls every second: ends right after
    finally:
        watcher.kill()
    watch = subprocess.CompletedProcess(watcher.args, watcher.returncode, out, err)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert "tiny-reverse: Running" in watch.stdout
    assert "step 300/300" in watch.stdout

    status = ftj_status(kubectl, namespace, "tiny-reverse")
    assert status["phase"] == "Succeeded"
    adapter = status["result"]["adapter"]
    assert adapter["uri"] == f"pvc://{CLAIM}/adapters/tiny-reverse"
    assert f"sha256   {adapter['sha256']}" in watch.stdout
    on_disk = run_pod(kubectl, namespace, "check-digest",
                      ["sha256sum", f"/mnt/pvc/{CLAIM}/adapters/tiny-reverse/adapter_model.safetensors"])  # fmt: skip
    assert on_disk.split()[0] == adapter["sha256"]
    assert status["result"]["metrics"]["final_loss"] < 0.5
    assert status["attempts"] == 1

    # The adapter learnt what the base model can't do: reverse the letters.
    samples = status["result"]["evaluation"]["samples"]
    expected = {s["prompt"]: " ".join(reversed(s["prompt"].split()[1:-1])) for s in samples}
    adapter_right = sum(s["adapter"].strip() == expected[s["prompt"]] for s in samples)
    base_right = sum(s["base"].strip() == expected[s["prompt"]] for s in samples)
    assert adapter_right >= 3 > base_right
    columns = kubectl("get", "ftj", "tiny-reverse", "-n", namespace, "-o", "wide").stdout
    assert "Succeeded" in columns and adapter["uri"] in columns

    # The operator and the trainer ran from the images built from the Dockerfile, on the real
    # node: the trainer's root was the image's (it read the image's
    # own version file beside its Python environment).
    version = project_version()
    (operator,) = operator_pods(kubectl)
    trainer_pods = "kubetune.io/job=tiny-reverse,app.kubernetes.io/component=trainer"
    (trainer,) = get_json(kubectl, "pods", "-n", namespace, "-l", trainer_pods)["items"]
    for pod, image in ((operator, "operator"), (trainer, "trainer")):
        assert pod["spec"]["nodeName"] == real_node
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"] == f"docker.io/kubetune/{image}:{version}"
        assert container["imageID"].startswith(f"docker.io/kubetune/{image}@sha256:")
    trainer_log = kubectl("logs", trainer["metadata"]["name"], "-n", namespace).stdout
    assert f"in /opt/kubetune, image kubetune-trainer {version}" in trainer_log

    # MLflow: the run's parameters, its loss at every logging step, the adapter as tags.
    client = mlflow.client()
    experiment = client.get_experiment_by_name(f"e2e-{namespace}")
    assert experiment is not None, "no run reached the MLflow server"
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("tiny-reverse", "FINISHED")
    assert run.data.params["max_steps"] == "300"
    assert run.data.params["kubetune.lora.r"] == str(job["spec"]["lora"]["r"])
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    every = job["spec"]["training"]["loggingSteps"]
    assert logged == {1, *range(every, 301, every)}
    assert run.data.tags["kubetune.adapter.uri"] == adapter["uri"]
    assert run.data.tags["kubetune.adapter.sha256"] == adapter["sha256"]
    assert run.data.tags["kubetune.dataset.fingerprint"] == status["result"]["datasetFingerprint"]
    assert status["result"]["tracking"] == {
        "mlflowExperimentId": experiment.experiment_id,
        "mlflowRunId": run.info.run_id,
    }
    # The password is in no status, Event, child object or trainer log.
    shown = {
        "FineTuneJob": kubectl("get", "ftj", "tiny-reverse", "-n", namespace, "-o", "json").stdout,
        "Events": kubectl("get", "events", "-n", namespace, "-o", "json").stdout,
        "ConfigMaps": kubectl("get", "configmaps", "-n", namespace, "-o", "json").stdout,
        "Jobs": kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout,
        "trainer log": kubectl("logs", "-n", namespace, "-l", "kubetune.io/job=tiny-reverse",
                               "--tail=-1", check=False).stdout,
    }  # fmt: skip
    for where, text in shown.items():
        assert mlflow.password not in text, f"the MLflow password shows in {where}"


def test_evicted_trainer_resumes_from_its_checkpoint_and_succeeds(
    kubectl: Kubectl, namespace: str
) -> None:
    seed_demo_claim(kubectl, namespace)
    apply(kubectl, namespace, tiny_job("preempted", maxSteps=600, checkpointSteps=50))

    def far_enough(status: dict[str, Any]) -> int | None:
        step = int((status.get("progress") or {}).get("step", 0))
        return step if step >= 150 else None

    step_at_eviction = wait_observing(
        kubectl, namespace, "preempted", far_enough, 240, "training past step 150"
    )
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", "kubetune.io/job=preempted")["items"]
    (pod,) = [p for p in pods if p["status"].get("phase") == "Running"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod["metadata"]["name"], "namespace": namespace}}  # fmt: skip
    kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/eviction",
            "-f", "-", input=json.dumps(eviction))  # fmt: skip

    status = wait_phase(kubectl, namespace, "preempted", {"Succeeded", "Failed"}, 240)
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 2
    resumed = status["result"]["metrics"]["resumed_from_step"]
    assert resumed >= 100, "the second pod started over instead of resuming"
    assert resumed >= (step_at_eviction // 50) * 50
    assert status["result"]["metrics"]["steps"] == 600
    # The loss curve on the resource spans the whole run, across the eviction, once per step.
    curve = [point["step"] for point in status["progress"]["history"]]
    assert curve == sorted(set(curve)) and len(curve) <= 200, curve
    assert curve[0] <= 50 and curve[-1] >= 550, curve
    assert [p for p in curve if p < step_at_eviction] and [p for p in curve if p > resumed]
    (job,) = trainer_jobs(kubectl, namespace, "preempted")
    assert job["status"].get("failed", 0) == 0, "an eviction must not count against backoffLimit"


def test_malformed_dataset_fails_in_validating_naming_the_line_before_any_gpu_pod(
    kubectl: Kubectl, namespace: str
) -> None:
    seed_demo_claim(kubectl, namespace)
    run_pod(kubectl, namespace, "break-data", ["sh", "-c",
            f"head -n 4 /mnt/pvc/{CLAIM}/data/reverse-prompt-completion.jsonl > /mnt/pvc/{CLAIM}/bad.jsonl"
            f" && echo '{{\"prompt\": \"cut off' >> /mnt/pvc/{CLAIM}/bad.jsonl"])  # fmt: skip
    job = tiny_job("bad-data")
    job["spec"]["dataset"]["uri"] = f"pvc://{CLAIM}/bad.jsonl"
    job["spec"]["resources"]["gpus"] = 1  # the local node has one: only validation keeps it free
    apply(kubectl, namespace, job)

    def finished() -> dict[str, Any] | None:
        status = ftj_status(kubectl, namespace, "bad-data")
        return status if status.get("phase") in ("Failed", "Succeeded") else None

    status = wait_for(finished, 240, "bad-data to finish", 0.5)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["status"], failed["reason"]) == (
        "Failed",
        "True",
        "DatasetError",
    )
    assert "bad.jsonl" in failed["message"] and "line 5" in failed["message"]
    assert status["result"]["reason"] == "DatasetError"
    # It never ran (a real node can finish the Validating phase before the operator's status
    # shows it, so the phase itself may go unseen: the Jobs below show where it failed).
    reasons = event_reasons(kubectl, namespace, "bad-data")
    assert "Running" not in reasons and "Starting" not in reasons, reasons
    assert "attempts" not in status and "estimate" not in status
    # Only the Validating phase's Job and its one CPU pod ever existed: no GPU was asked for.
    jobs = get_json(kubectl, "jobs", "-n", namespace, "-l", "kubetune.io/job=bad-data")["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["bad-data-validate"]
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", "kubetune.io/job=bad-data")["items"]
    assert len(pods) == 1 and gpu_requests(pods[0]) == []
    assert pods[0]["spec"]["containers"][0]["command"][:2] == ["kubetune-trainer", "preflight"]
    assert event_reasons(kubectl, namespace, "bad-data")[-1] == "DatasetError"


@pytest.mark.usefixtures("cpu_hog")
def test_job_suspended_before_it_starts_is_validated_once_resumed_and_runs_the_steps_estimated(
    kubectl: Kubectl, namespace: str
) -> None:
    # Runs while busy loops hold every core (the cpu_hog fixture): the waits follow the job's
    # own pace, so a slower machine means a longer run, not a failure.
    seed_demo_claim(kubectl, namespace)
    # Epochs of packed rows: the step count is the data's, not a number the spec gives.
    job = tiny_job("held", epochs=1, packing=True)
    del job["spec"]["training"]["maxSteps"]
    job["spec"]["runPolicy"] = {"suspend": True}
    apply(kubectl, namespace, job)

    wait_phase(kubectl, namespace, "held", {"Suspended"}, 60)
    time.sleep(3)
    assert get_json(kubectl, "pods", "-n", namespace, "-l", "kubetune.io/job=held")["items"] == []

    kubectl("patch", "ftj", "held", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}')  # fmt: skip
    seen: dict[str, Any] = {}

    def trainer_job_made() -> bool:
        # The status read after the trainer Job is seen: the estimate must be there already.
        jobs = trainer_jobs(kubectl, namespace, "held")
        seen.update(status=ftj_status(kubectl, namespace, "held"))
        seen.setdefault("phases", []).append(seen["status"].get("phase"))
        return bool(jobs)

    # Validation runs first (a CPU pod); past the phase, the trainer Job follows at once.
    wait_phase(kubectl, namespace, "held", {"Pending", "Running", "Succeeded", "Failed"}, 240)
    wait_for(trainer_job_made, 60, "the trainer Job of held", 0.5)
    estimate = seen["status"].get("estimate")
    assert estimate, f"no status.estimate when the trainer Job appeared: {seen['status']}"
    assert "Validating" in event_reasons(kubectl, namespace, "held")
    assert estimate["examples"] == 512 and estimate["sampled"] is False
    assert 0 < estimate["sequences"] < estimate["examples"]  # packed
    table = kubectl("get", "ftj", "held", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    # Columns start where their header does (empty ones, like LOSS before training, are blank).
    assert row[header.index("STEPS") :].split()[0] == str(estimate["steps"])

    status = wait_phase(kubectl, namespace, "held", {"Succeeded", "Failed"}, 300)
    assert status["phase"] == "Succeeded", status
    assert status["estimate"] == estimate
    assert status["result"]["metrics"]["steps"] == estimate["steps"]
    assert status["progress"]["totalSteps"] == estimate["steps"]
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "False"


def test_operator_killed_mid_run_comes_back_to_the_same_job(
    kubectl: Kubectl, namespace: str
) -> None:
    seed_demo_claim(kubectl, namespace)
    apply(kubectl, namespace, tiny_job("survivor", maxSteps=600))
    wait_phase(kubectl, namespace, "survivor", {"Running"}, 240)
    (job_before,) = trainer_jobs(kubectl, namespace, "survivor")

    (operator,) = operator_pods(kubectl)
    kubectl("delete", "pod", operator["metadata"]["name"], "-n", operator["metadata"]["namespace"],
            "--grace-period=0", "--force")  # fmt: skip
    wait_for(lambda: [p for p in operator_pods(kubectl)
                      if p["metadata"]["uid"] != operator["metadata"]["uid"] and ready(p)], 120,
             "the Deployment's new operator pod to be Ready")  # fmt: skip

    # The new operator must find the job still training: one that only ever saw it finished
    # would pass the rest of this test too.
    (job_now,) = trainer_jobs(kubectl, namespace, "survivor")
    running = job_now.get("status") or {}
    assert running.get("active") == 1 and not running.get("succeeded"), running
    seen = get_json(kubectl, "ftj", "survivor", "-n", namespace)["status"]
    assert seen["phase"] == "Running", seen
    assert (seen.get("progress") or {}).get("step", 0) < 600, seen.get("progress")

    status = wait_phase(kubectl, namespace, "survivor", {"Succeeded", "Failed"}, 240)
    assert status["phase"] == "Succeeded"
    (job_after,) = trainer_jobs(kubectl, namespace, "survivor")
    assert job_after["metadata"]["uid"] == job_before["metadata"]["uid"]  # type: ignore[index]


def test_two_teams_train_at_once_each_seeing_only_their_own(
    kubectl: Kubectl, namespace: str
) -> None:
    other = f"{namespace[:50]}-b"
    kubectl("create", "namespace", other)
    teams = {namespace: "team-a", other: "team-b"}
    try:
        wait_for(lambda: kubectl("get", "sa", "default", "-n", other, check=False).returncode == 0,
                 30, "default serviceaccount")  # fmt: skip
        for ns, name in teams.items():
            seed_demo_claim(kubectl, ns)
            apply(kubectl, ns, tiny_job(name, maxSteps=120))
        finished = {ns: wait_phase(kubectl, ns, name, {"Succeeded", "Failed"}, 240)
                    for ns, name in teams.items()}  # fmt: skip
        assert {s["phase"] for s in finished.values()} == {"Succeeded"}
        for ns, name in teams.items():
            listing = run_pod(kubectl, ns, "list-adapters", ["ls", f"/mnt/pvc/{CLAIM}/adapters"])
            assert listing.split() == [name]

        # Team A's trainer has no API identity: no token mounted, and its namespace's account
        # may write no status, its own job's or team B's (its progress went to the operator).
        (job_a,) = trainer_jobs(kubectl, namespace, "team-a")
        pod_spec = job_a["spec"]["template"]["spec"]  # type: ignore[index]
        assert pod_spec["automountServiceAccountToken"] is False
        who = f"system:serviceaccount:{namespace}:{pod_spec['serviceAccountName']}"

        def can_i(*args: str) -> str:
            return kubectl("auth", "can-i", *args, "--as", who, check=False).stdout.strip()

        own, theirs = "finetunejobs.kubetune.io/team-a", "finetunejobs.kubetune.io/team-b"
        assert can_i("patch", own, "--subresource=status", "-n", namespace) == "no"
        assert can_i("patch", theirs, "--subresource=status", "-n", other) == "no"
        assert finished[namespace].get("progress"), "team A's progress never reached its status"
        assert can_i("patch", own, "-n", namespace) == "no"
        assert can_i("get", "secrets", "-n", namespace) == "no"
    finally:
        kubectl("delete", "namespace", other, "--wait=false", check=False)


def while_progressing(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    reached: Callable[[dict[str, Any]], Any],
    what: str,
    stall: float = 300,
) -> Any:
    """Poll the FineTuneJob's status until ``reached`` says so; fail only when neither its phase,
    its reason nor its progress moved for ``stall`` seconds (a loaded machine trains slowly,
    a stuck one doesn't train at all)."""
    last: tuple[Any, ...] = ()
    moved = time.monotonic()
    while True:
        status = ftj_status(kubectl, namespace, name)
        value = reached(status) if status else None
        if value:
            return value
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        seen = (
            status.get("phase"),
            ready.get("reason"),
            (status.get("progress") or {}).get("step"),
        )
        if seen != last:
            last, moved = seen, time.monotonic()
        if time.monotonic() - moved > stall:
            raise AssertionError(f"{name} stalled for {stall:.0f}s at {last} waiting for {what}")
        time.sleep(1)


def test_two_pod_group_trains_through_one_rendezvous_and_resumes_whole_after_a_lost_pod(
    kubectl: Kubectl, namespace: str
) -> None:
    """`nodes: 2`: an Indexed Job of two pods that find rank 0 by name (the headless Service,
    through the cluster DNS: CoreDNS of the real node) and train as two gloo ranks; one pod lost mid-run restarts the
    group, which resumes from its checkpoint; one adapter, written by rank 0."""
    seed_demo_claim(kubectl, namespace)
    job = tiny_job("two-pods", maxSteps=40, checkpointSteps=10, microBatchSize=8)
    # Half a core each: both pods fit the two-core node beside the operator.
    job["spec"]["resources"].update(nodes=2, cpu="500m")
    apply(kubectl, namespace, job)

    step_at_loss = int(
        while_progressing(
            kubectl, namespace, "two-pods",
            lambda s: ((s.get("progress") or {}).get("step", 0) >= 15) and s["progress"]["step"],
            "the group training past step 15",
        )
    )  # fmt: skip
    group_pods = "kubetune.io/job=two-pods,app.kubernetes.io/component=trainer"
    running = get_json(kubectl, "pods", "-n", namespace, "-l", group_pods)["items"]
    (rank_one,) = [
        p for p in running
        if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"
        and p["status"].get("phase") == "Running"
    ]  # fmt: skip
    kubectl("delete", "pod", rank_one["metadata"]["name"], "-n", namespace, "--wait=false")

    status = while_progressing(
        kubectl, namespace, "two-pods",
        lambda s: s.get("phase") in ("Succeeded", "Failed") and s, "the group to finish",
    )  # fmt: skip
    assert status["phase"] == "Succeeded", status
    assert (status["attempts"], status["worldSize"]) == (2, 2)
    metrics = status["result"]["metrics"]
    assert metrics["resumed_from_step"] >= 10, "the group started over instead of resuming"
    assert metrics["resumed_from_step"] >= (step_at_loss // 10) * 10
    assert metrics["steps"] == 40
    # One adapter, its digest the file's; reported from rank 0's pod of the last attempt.
    adapter = status["result"]["adapter"]
    folder = f"/mnt/pvc/{CLAIM}/adapters/two-pods"
    listing = run_pod(kubectl, namespace, "check-group-adapter",
                      ["sh", "-c", f"ls {folder}; sha256sum {folder}/adapter_model.safetensors"])  # fmt: skip
    assert listing.split().count("adapter_model.safetensors") == 1
    assert adapter["sha256"] in listing
    (group_job,) = trainer_jobs(kubectl, namespace, "two-pods")
    assert group_job["metadata"]["annotations"]["kubetune.io/attempt"] == "2"
    pods = get_json(kubectl, "pods", "-n", namespace, "-l",
                    f"batch.kubernetes.io/controller-uid={group_job['metadata']['uid']}")["items"]  # fmt: skip
    ranks = {p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]:
             p["metadata"]["name"] for p in pods}  # fmt: skip
    assert status["podName"] == ranks["0"] and len(ranks) == 2
    wide = kubectl("get", "ftj", "two-pods", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[1][wide[0].index("RANKS") :].split()[0] == "2"
