"""The operator as a process against the real local control plane (kubetune.local).

The operator runs as ``kubetune-operator`` with the cluster's kubeconfig; FineTuneJobs go in
through kubectl, and every assertion is on what a user sees: status, children, files on the PVC.
Trainer pods run in containers on the session's real node, from the tests' trainer image (the
trainer image plus the stand-in, ``trainer_test_image``). Jobs that need no training give the
stand-in a plan through ``spec.podTemplate`` (``sleep``), so lifecycle tests cost seconds.
A failing test prints the operator's log tail; ``KUBETUNE_TEST_OPERATOR_VERBOSE=true`` and
``KUBETUNE_TEST_OPERATOR_LOG_LINES=N`` make it say more.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operatorkit import (
    CLAIM,
    CRD,
    REPO,
    TINY_SETTINGS,
    OperatorProcess,
    host_service,
    log_tail_after,
    started,
    work_claim,
)

from kubetune_devtools.installs import real_node_state
from kubetune_devtools.loopback import LoopbackServer
from kubetune_devtools.pytest_plugin import (
    REAL_NODE,
    ClusterHandle,
    Kubectl,
    get_json,
    install_crd,
    on_real_node,
    temporary_namespace,
    wait_for,
)

pytestmark = pytest.mark.integration

#: A GPU resource no node of the test cluster offers: the scheduler's answer is deterministic.
MISSING_GPU = "kubetune.io/test-gpu"


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> None:
    install_crd(kubectl, CRD)


@pytest.fixture(scope="module")
def operator(
    crd: None, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    yield from started(
        OperatorProcess(kubeconfig_path, tmp_path_factory.mktemp("operator") / "log")
    )


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


# --- helpers -----------------------------------------------------------------------------------


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def finetunejob(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def ftj_status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    result = kubectl("get", "ftj", name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    status: dict[str, Any] = json.loads(result.stdout).get("status") or {}
    return status


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def wait_status(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    accept: Callable[[dict[str, Any]], bool],
    timeout: float,
    what: str,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = ftj_status(kubectl, namespace, name)
        return status if status and accept(status) else None

    status: dict[str, Any] = wait_for(check, timeout, f"FineTuneJob {name}: {what}")
    return status


def wait_phase(
    kubectl: Kubectl, namespace: str, name: str, phases: set[str], timeout: float
) -> dict[str, Any]:
    return wait_status(
        kubectl, namespace, name, lambda s: s.get("phase") in phases, timeout, f"{sorted(phases)}"
    )


def wait_ready_reason(
    kubectl: Kubectl, namespace: str, name: str, reason: str, timeout: float
) -> dict[str, Any]:
    return wait_status(
        kubectl,
        namespace,
        name,
        lambda s: condition(s, "Ready").get("reason") == reason,
        timeout,
        f"Ready=False/{reason}",
    )


def jobs_of(
    kubectl: Kubectl, namespace: str, component: str | None = "trainer"
) -> list[dict[str, Any]]:
    """The trainer Jobs in ``namespace`` (``component=None``: every Job, the Validating phase's
    and any other)."""
    selector = ["-l", f"app.kubernetes.io/component={component}"] if component else []
    items: list[dict[str, Any]] = get_json(kubectl, "jobs", "-n", namespace, *selector)["items"]
    return items


def pods_of(
    kubectl: Kubectl, namespace: str, name: str, component: str = "trainer"
) -> list[dict[str, Any]]:
    """The pods of ``name``'s trainer Job (``component="validator"``: of its Validating phase)."""
    selector = f"kubetune.io/job={name},app.kubernetes.io/component={component}"
    items: list[dict[str, Any]] = get_json(kubectl, "pods", "-n", namespace, "-l", selector)[
        "items"
    ]
    return items


def tiny_training_spec(dataset: str, **training: Any) -> dict[str, Any]:
    settings = copy.deepcopy(TINY_SETTINGS)
    settings["training"].update(training)
    return {
        "model": {"uri": f"pvc://{CLAIM}/model"},
        "dataset": {"uri": dataset, "format": "prompt-completion"},
        **settings,
        "output": {"uri": f"pvc://{CLAIM}/adapter"},
    }


def sleeper_spec(seconds: int, exit_code: int = 0, **extra: Any) -> dict[str, Any]:
    """A job whose trainer sleeps, then exits with ``exit_code`` (the stand-in trainer, told so
    through its env): the lifecycle without ML."""
    plan = f"sleep:{seconds},exit:{exit_code}"
    return {
        "model": {"uri": "org/model"},
        "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
        "output": {"uri": "s3://bucket/adapter"},
        "resources": {"gpus": 0, "shmSize": "64Mi"},
        "podTemplate": {
            "spec": {
                "containers": [
                    {"name": "trainer", "env": [{"name": "KUBETUNE_STAND_IN", "value": plan}]}
                ]
            }
        },
        **extra,
    }


def unschedulable_spec(**extra: Any) -> dict[str, Any]:
    """A GPU job no node can take (its data isn't real: the Validating phase is off, so the
    trainer Job is made at once)."""
    return {
        "model": {"uri": "org/model"},
        "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
        "output": {"uri": "s3://bucket/adapter"},
        "resources": {"gpus": 1, "gpuResourceName": MISSING_GPU},
        "validation": {"enabled": False},
        **extra,
    }


def event_reasons(kubectl: Kubectl, namespace: str, name: str) -> list[str]:
    events = get_json(
        kubectl,
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=FineTuneJob,involvedObject.name={name}",
    )["items"]
    return [str(event.get("reason")) for event in events]


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- scenarios ---------------------------------------------------------------------------------


def test_operator_answers_its_liveness_probe(operator: OperatorProcess) -> None:
    def alive() -> bool:
        try:
            with urllib.request.urlopen(operator.liveness_url, timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_for(alive, 30, "the liveness endpoint to answer 200")


def test_tiny_job_succeeds_with_an_adapter_whose_digest_matches_the_pvc_file(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, tiny_assets: Path
) -> None:
    volume = work_claim(kubectl, namespace)
    shutil.copytree(tiny_assets / "model", volume / "model")
    shutil.copytree(tiny_assets / "data", volume / "data")
    spec = tiny_training_spec(f"pvc://{CLAIM}/data/reverse-prompt-completion.jsonl")
    apply(kubectl, namespace, finetunejob("tiny", spec))

    progress_while_running: list[dict[str, Any]] = []
    table_while_running: list[str] = []

    def finished() -> dict[str, Any] | None:
        status = ftj_status(kubectl, namespace, "tiny")
        if status.get("phase") == "Running" and status.get("progress"):
            progress_while_running.append(status["progress"])
            if not table_while_running:
                table_while_running.append(kubectl("get", "ftj", "tiny", "-n", namespace).stdout)
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status: dict[str, Any] = wait_for(finished, 600, "the tiny job to finish", interval=0.3)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert condition(status, "Succeeded")["status"] == "True"
    assert progress_while_running, "status.progress was never seen while the job ran"
    assert progress_while_running[0]["step"] >= 0
    header, row = table_while_running[0].splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "LOSS"]
    assert row.split()[:2] == ["tiny", "Running"]
    assert status["progress"]["step"] >= 1

    adapter = status["result"]["adapter"]
    assert adapter["uri"].startswith(f"pvc://{CLAIM}/adapter")
    local = volume / adapter["uri"].removeprefix(f"pvc://{CLAIM}/")
    weights = local / "adapter_model.safetensors" if local.is_dir() else local
    assert weights.is_file()
    assert adapter["sha256"] == sha256_of(weights)
    assert adapter["sizeBytes"] == weights.stat().st_size
    assert status["attempts"] == 1
    assert status["startTime"] and status["completionTime"]
    assert status["observedGeneration"] == 1


def test_missing_dataset_fails_with_dataset_error_after_one_attempt(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, tiny_assets: Path
) -> None:
    volume = work_claim(kubectl, namespace)
    shutil.copytree(tiny_assets / "model", volume / "model")
    spec = tiny_training_spec(f"pvc://{CLAIM}/data/no-such-file.jsonl")
    apply(kubectl, namespace, finetunejob("no-data", spec))

    status = wait_phase(kubectl, namespace, "no-data", {"Succeeded", "Failed"}, 300)
    assert status["phase"] == "Failed"
    failed = condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "DatasetError"), failed
    assert "no-such-file.jsonl" in failed["message"]
    # Found by the Validating phase's one pod (not retried); no trainer pod was ever made.
    assert len(pods_of(kubectl, namespace, "no-data", component="validator")) == 1
    assert pods_of(kubectl, namespace, "no-data") == []
    assert "attempts" not in status


def test_job_without_a_schedulable_gpu_node_is_pending_unschedulable(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("no-gpu", unschedulable_spec()))

    status = wait_ready_reason(kubectl, namespace, "no-gpu", "Unschedulable", 90)
    assert status["phase"] == "Pending"
    assert f"Insufficient {MISSING_GPU}" in condition(status, "Ready")["message"]
    wait_for(
        lambda: "Unschedulable" in event_reasons(kubectl, namespace, "no-gpu"),
        30,
        "an Unschedulable event on the FineTuneJob",
    )


def test_missing_pvc_is_reported_and_the_job_starts_once_it_exists(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = sleeper_spec(1, output={"uri": f"pvc://{CLAIM}/adapter"})
    apply(kubectl, namespace, finetunejob("waits-for-pvc", spec))
    status = wait_ready_reason(kubectl, namespace, "waits-for-pvc", "MissingReference", 60)
    assert f"PersistentVolumeClaim '{CLAIM}' not found" in condition(status, "Ready")["message"]
    assert jobs_of(kubectl, namespace, component=None) == []

    work_claim(kubectl, namespace)
    status = wait_phase(kubectl, namespace, "waits-for-pvc", {"Succeeded", "Failed"}, 120)
    assert status["phase"] == "Succeeded"


EDITOR = "editor@example.com"


def test_companions_made_first_by_an_edit_user_carry_the_rendered_content(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    """While a job waits on a missing claim, a user with the ordinary `edit` role makes its
    ConfigMap first, with the job's uid as its owner, and the namespace's trainer NetworkPolicy
    (which no job owns) open to everything: the operator must not adopt what they say, but write
    the rendered content over them."""
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "editor"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": EDITOR}],
    }  # fmt: skip
    apply(kubectl, namespace, binding)
    spec = sleeper_spec(1, output={"uri": f"pvc://{CLAIM}/adapter"})
    apply(kubectl, namespace, finetunejob("pre-made", spec))
    wait_ready_reason(kubectl, namespace, "pre-made", "MissingReference", 60)
    uid = get_json(kubectl, "ftj", "pre-made", "-n", namespace)["metadata"]["uid"]
    owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "pre-made",
             "uid": uid, "controller": True}  # fmt: skip
    forged_config = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "pre-made-trainer-config", "ownerReferences": [owner]},
        "data": {"config.yaml": "forged: by-the-editor\n", "extra.yaml": "x: 1\n"},
    }  # fmt: skip
    open_policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "kubetune-trainers"},
        "spec": {"podSelector": {"matchLabels": {"nothing": "selected"}},
                 "policyTypes": ["Egress"], "egress": [{}]},
    }  # fmt: skip
    for forged in (forged_config, open_policy):
        kubectl("--as", EDITOR, "create", "-n", namespace, "-f", "-", input=json.dumps(forged))

    work_claim(kubectl, namespace)
    status = wait_phase(kubectl, namespace, "pre-made", {"Succeeded", "Failed"}, 120)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    config = get_json(kubectl, "configmap", "pre-made-trainer-config", "-n", namespace)
    assert set(config["data"]) == {"config.yaml"}
    assert "by-the-editor" not in config["data"]["config.yaml"]
    assert "kubetune.io/job-uid" in config["metadata"]["labels"]
    rendered = yaml.safe_load(config["data"]["config.yaml"])
    assert rendered["job"]["name"] == "pre-made" and rendered["job"]["uid"] == uid
    policy = get_json(kubectl, "networkpolicy", "kubetune-trainers", "-n", namespace)["spec"]
    assert policy["podSelector"] == {"matchLabels": {
        "app.kubernetes.io/name": "kubetune", "app.kubernetes.io/managed-by": "kubetune-operator"}}  # fmt: skip
    assert {} not in policy["egress"]
    (pod,) = pods_of(kubectl, namespace, "pre-made")
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_suspend_and_resume(operator: OperatorProcess, kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, finetunejob("pause", sleeper_spec(300, runPolicy={"suspend": True})))
    status = wait_phase(kubectl, namespace, "pause", {"Suspended"}, 60)
    assert condition(status, "Suspended")["status"] == "True"
    # Suspended before it started: its Validating phase waits, suspended, and nothing runs.
    (validation,) = jobs_of(kubectl, namespace, component="validator")
    assert validation["spec"]["suspend"] is True
    assert jobs_of(kubectl, namespace) == []
    assert pods_of(kubectl, namespace, "pause", component="validator") == []

    kubectl(
        "patch", "ftj", "pause", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runPolicy":{"suspend":false}}}',
    )  # fmt: skip
    status = wait_phase(kubectl, namespace, "pause", {"Running"}, 90)
    assert condition(status, "Suspended")["status"] == "False"
    assert condition(status, "Running")["status"] == "True"
    (job,) = jobs_of(kubectl, namespace)

    kubectl(
        "patch", "ftj", "pause", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runPolicy":{"suspend":true}}}',
    )  # fmt: skip
    wait_phase(kubectl, namespace, "pause", {"Suspended"}, 60)
    wait_for(lambda: not pods_of(kubectl, namespace, "pause"), 60, "the pod to go away")
    assert [j["metadata"]["uid"] for j in jobs_of(kubectl, namespace)] == [job["metadata"]["uid"]]


def test_deleting_a_running_job_removes_its_job_and_pods(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("doomed", sleeper_spec(300)))
    wait_phase(kubectl, namespace, "doomed", {"Running"}, 90)
    assert len(jobs_of(kubectl, namespace)) == 1

    kubectl("delete", "ftj", "doomed", "-n", namespace, "--wait=true", timeout=60)
    wait_for(lambda: not jobs_of(kubectl, namespace), 60, "the Job to be collected")
    wait_for(lambda: not pods_of(kubectl, namespace, "doomed"), 60, "the pods to be collected")
    for kind in ("configmap", "networkpolicy"):
        wait_for(
            lambda kind=kind: (
                not get_json(kubectl, kind, "-n", namespace, "-l", "kubetune.io/job=doomed")[
                    "items"
                ]
            ),
            60,
            f"the {kind} to be collected",
        )


def test_a_job_an_earlier_version_left_with_kopfs_finalizer_is_deleted_all_the_same(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    """An earlier kubetune put kopf's finalizer on FineTuneJobs; this one watches them itself
    (kopf, which took it off, no longer does) and takes it off, so the deletion is not held."""
    manifest = finetunejob("legacy", sleeper_spec(300, runPolicy={"suspend": True}))
    manifest["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
    apply(kubectl, namespace, manifest)
    wait_for(
        lambda: (
            not get_json(kubectl, "ftj", "legacy", "-n", namespace)["metadata"].get("finalizers")
        ),
        60,
        "the earlier version's finalizer to be taken off",
    )
    kubectl("delete", "ftj", "legacy", "-n", namespace, "--wait=true", "--timeout=60s")


def test_operator_killed_mid_run_and_restarted_keeps_the_job_and_completes(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("survivor", sleeper_spec(12)))
    wait_phase(kubectl, namespace, "survivor", {"Running"}, 90)
    (job,) = jobs_of(kubectl, namespace)

    operator.kill()
    time.sleep(2)
    operator.start()

    status = wait_phase(kubectl, namespace, "survivor", {"Succeeded", "Failed"}, 120)
    assert status["phase"] == "Succeeded"
    assert [j["metadata"]["uid"] for j in jobs_of(kubectl, namespace)] == [job["metadata"]["uid"]]
    assert status["jobName"] == job["metadata"]["name"]


def test_finished_job_is_deleted_after_its_ttl(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = sleeper_spec(1, runPolicy={"ttlSecondsAfterFinished": 2})
    apply(kubectl, namespace, finetunejob("short-lived", spec))
    wait_phase(kubectl, namespace, "short-lived", {"Succeeded"}, 90)
    try:
        wait_for(
            lambda: kubectl("get", "ftj", "short-lived", "-n", namespace, check=False).returncode,
            60,
            "the FineTuneJob to be deleted after its TTL",
        )
    except AssertionError:
        print(kubectl("get", "ftj", "short-lived", "-n", namespace, "-o", "yaml").stdout)
        raise


def test_mlflow_credentials_to_a_plain_http_host_fail_the_job_denied_naming_the_field(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = sleeper_spec(1, tracking={"mlflow": {
        "trackingUri": "http://attacker.example:53", "experimentName": "e",
        "tokenSecretRef": {"name": "mlflow", "key": "token"}}})  # fmt: skip
    apply(kubectl, namespace, finetunejob("plain-http", spec))
    status = wait_phase(kubectl, namespace, "plain-http", {"Failed"}, 60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "Denied"
    assert failed["message"].startswith(
        "spec.tracking.mlflow.trackingUri: credentials (usernameSecretRef, passwordSecretRef, "
        "tokenSecretRef) go only over https; 'attacker.example:53' is plain http"
    )
    assert jobs_of(kubectl, namespace, component=None) == []


def test_denied_option_fails_the_job_without_creating_children(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = unschedulable_spec(model={"uri": "org/model", "trustRemoteCode": True})
    apply(kubectl, namespace, finetunejob("remote-code", spec))
    status = wait_phase(kubectl, namespace, "remote-code", {"Failed"}, 60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "Denied"
    assert "spec.model.trustRemoteCode" in failed["message"]
    assert jobs_of(kubectl, namespace, component=None) == []


def _cluster_endpoint(kubectl: Kubectl) -> tuple[str, ssl.SSLContext]:
    config = json.loads(kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cluster = config["clusters"][0]["cluster"]
    context = ssl.create_default_context()
    if "certificate-authority-data" in cluster:
        context.load_verify_locations(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
    else:
        context.load_verify_locations(cafile=cluster["certificate-authority"])
    return cluster["server"], context


def chart_template_applied(
    helm: Callable[..., Any], kubectl: Kubectl, template: str
) -> Iterator[None]:
    """For a fixture to ``yield from``: the chart's ``templates/<template>`` (release ``kt`` in
    ``kubetune-system``) applied to the cluster, then deleted."""
    rendered = helm("template", "kt", str(REPO / "charts" / "kubetune"), "-n", "kubetune-system",
                    "-s", f"templates/{template}")  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    kubectl("apply", "-f", "-", input=rendered.stdout)
    yield
    kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered.stdout)


@pytest.fixture(scope="module")
def trainer_status_policy(helm: Callable[..., Any], kubectl: Kubectl) -> Iterator[None]:
    """The chart's ValidatingAdmissionPolicy for trainer identities, for this module only (it
    names the chart's operator, which other suites install)."""
    yield from chart_template_applied(helm, kubectl, "trainer-status-policy.yaml")


@pytest.fixture(scope="module")
def references_policy(helm: Callable[..., Any], kubectl: Kubectl) -> Iterator[None]:
    """The chart's ValidatingAdmissionPolicy that refuses references the creator can't read."""
    yield from chart_template_applied(helm, kubectl, "references-policy.yaml")


def _patch_status_as(
    server: str,
    context: ssl.SSLContext,
    token: str,
    namespace: str,
    name: str,
    status: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> int:
    status = status or {"progress": {"step": 1, "totalSteps": 10}}
    body = json.dumps({"status": status}).encode()
    query = "?dryRun=All" if dry_run else ""
    request = urllib.request.Request(
        f"{server}/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status{query}",
        data=body,
        method="PATCH",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
        },
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def grant_trainers_status_writes(kubectl: Kubectl, namespace: str, account: str) -> str:
    """What a careless admin might do: give the namespace's trainer ServiceAccount status
    writes (kubetune grants it nothing; the trainer-status policy still holds it to progress).
    An API token of that account."""
    apply(kubectl, namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "careless-status-writes"},
        "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"],
                   "verbs": ["get", "patch"]}],
    })  # fmt: skip
    apply(kubectl, namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "careless-status-writes"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "careless-status-writes"},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    })  # fmt: skip
    wait_for(
        lambda: kubectl("auth", "can-i", "patch", "finetunejobs", "--subresource=status",
                        "-n", namespace, "--as", f"system:serviceaccount:{namespace}:{account}",
                        check=False).stdout.strip() == "yes",
        30,
        "the careless RoleBinding to take effect",
    )  # fmt: skip
    return kubectl("create", "token", account, "-n", namespace).stdout.strip()


def test_a_trainer_identity_may_change_progress_and_nothing_else(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, trainer_status_policy: None
) -> None:
    apply(
        kubectl, namespace, finetunejob("honest", unschedulable_spec(runPolicy={"suspend": True}))
    )
    before = wait_phase(kubectl, namespace, "honest", {"Suspended"}, 60)
    job = get_json(kubectl, "job", "honest", "-n", namespace)
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    token = grant_trainers_status_writes(kubectl, namespace, account)
    server, context = _cluster_endpoint(kubectl)
    forged_result = {
        "outcome": "Succeeded", "reason": "Succeeded",
        "adapter": {"uri": "s3://attacker/adapter", "sha256": "0" * 64, "sizeBytes": 1},
    }  # fmt: skip

    # An admission policy takes effect once the apiserver has loaded it: wait for that, without
    # side effects (a dry run is admitted like a real request).
    wait_for(
        lambda: _patch_status_as(
            server, context, token, namespace, "honest", {"phase": "Succeeded"}, dry_run=True
        ) == 403,
        60,
        "the trainer-status policy to take effect",
    )  # fmt: skip
    for forged in (
        {"phase": "Succeeded"},
        {"result": forged_result},
        {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                         "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        {"attempts": 7},
        {"progress": {"step": 2}, "phase": "Failed"},
    ):  # fmt: skip
        assert _patch_status_as(server, context, token, namespace, "honest", forged) == 403, forged

    assert _patch_status_as(server, context, token, namespace, "honest") == 200
    after = ftj_status(kubectl, namespace, "honest")
    assert after["progress"]["step"] == 1
    assert {k: v for k, v in after.items() if k != "progress"} == {
        k: v for k, v in before.items() if k != "progress"
    }


@pytest.fixture
def other_release_namespace(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    """Where a second release of the chart would run its operator (one release per team)."""
    yield from temporary_namespace(kubectl, f"{namespace}-other")


def test_another_releases_operator_may_write_status_while_the_trainer_may_not(
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    other_release_namespace: str,
    trainer_status_policy: None,
) -> None:
    """Two releases of the chart, one per team: this release's policy must not deny the other
    release's operator (a ServiceAccount of its own namespace) the status writes RBAC grants it,
    and must still hold the job's own trainer to status.progress."""
    apply(
        kubectl, namespace, finetunejob("shared", unschedulable_spec(runPolicy={"suspend": True}))
    )
    wait_phase(kubectl, namespace, "shared", {"Suspended"}, 60)
    job = get_json(kubectl, "job", "shared", "-n", namespace)
    trainer = job["spec"]["template"]["spec"]["serviceAccountName"]
    trainer_token = grant_trainers_status_writes(kubectl, namespace, trainer)
    # Release B's operator: a ServiceAccount of its own namespace, granted status writes here.
    kubectl("create", "serviceaccount", "kubetune", "-n", other_release_namespace)
    apply(kubectl, namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "other-release-status"},
        "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"],
                   "verbs": ["get", "patch"]}],
    })  # fmt: skip
    apply(kubectl, namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "other-release-status"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "other-release-status"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubetune",
                      "namespace": other_release_namespace}],
    })  # fmt: skip
    other_operator = f"system:serviceaccount:{other_release_namespace}:kubetune"
    other_token = kubectl(
        "create", "token", "kubetune", "-n", other_release_namespace
    ).stdout.strip()
    server, context = _cluster_endpoint(kubectl)
    wait_for(
        lambda: kubectl("auth", "can-i", "patch", "finetunejobs", "--subresource=status",
                        "-n", namespace, "--as", other_operator,
                        check=False).stdout.strip() == "yes",
        30,
        "the other release's RoleBinding to take effect",
    )  # fmt: skip
    wait_for(
        lambda: _patch_status_as(
            server, context, trainer_token, namespace, "shared", {"phase": "Succeeded"},
            dry_run=True,
        ) == 403,
        60,
        "the trainer-status policy to take effect",
    )  # fmt: skip

    assert _patch_status_as(server, context, other_token, namespace, "shared",
                            {"phase": "Running"}) == 200  # fmt: skip
    assert _patch_status_as(server, context, trainer_token, namespace, "shared",
                            {"phase": "Succeeded"}) == 403  # fmt: skip


# --- every row of the README's reason table that the local cluster can reach -------------------


def test_spec_the_schema_accepts_but_the_models_refuse_fails_invalid_spec(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = unschedulable_spec(model={"uri": "ftp://mirror.invalid/llama"})
    apply(kubectl, namespace, finetunejob("ftp-model", spec))
    status = wait_phase(kubectl, namespace, "ftp-model", {"Failed"}, 60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.model.uri" in failed["message"] and "'ftp'" in failed["message"]
    assert status["result"]["reason"] == "InvalidSpec"
    assert jobs_of(kubectl, namespace, component=None) == []
    assert "InvalidSpec" in event_reasons(kubectl, namespace, "ftp-model")


@pytest.mark.parametrize("secret_data", [None, {"other": "dmFsdWU="}], ids=["no-secret", "no-key"])
def test_missing_secret_or_key_is_reported_and_the_job_starts_once_it_exists(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, secret_data: dict[str, str] | None
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub"}}
    if secret_data is not None:
        apply(kubectl, namespace, {**secret, "data": secret_data})
    spec = sleeper_spec(1, model={"uri": "org/model", "tokenSecretRef": {"name": "hub"}})
    apply(kubectl, namespace, finetunejob("needs-token", spec))

    status = wait_ready_reason(kubectl, namespace, "needs-token", "MissingReference", 90)
    assert status["phase"] == "Pending"
    # The same words whether the Secret or only its key is missing: a creator who may not read
    # Secrets learns neither.
    assert condition(status, "Ready")["message"] == (
        "spec.model.tokenSecretRef: the Secret or its key is not available to the trainer pod "
        "(the pod starts once it is)"
    )

    apply(kubectl, namespace, {**secret, "data": {"token": "c2VjcmV0LXZhbHVlLTEyMzQ="}})
    status = wait_phase(kubectl, namespace, "needs-token", {"Succeeded", "Failed"}, 120)
    assert status["phase"] == "Succeeded"
    assert "secret-value-1234" not in json.dumps(status)


def test_run_past_its_active_deadline_fails_deadline_exceeded(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = sleeper_spec(300, runPolicy={"activeDeadlineSeconds": 5})
    apply(kubectl, namespace, finetunejob("too-slow", spec))
    status = wait_phase(kubectl, namespace, "too-slow", {"Succeeded", "Failed"}, 120)
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not [p for p in pods_of(kubectl, namespace, "too-slow")
                          if p["status"].get("phase") == "Running"], 60, "the pod to stop")  # fmt: skip


def test_unexpected_exit_is_retried_up_to_the_backoff_limit_then_fails(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    spec = sleeper_spec(0, exit_code=1, runPolicy={"backoffLimit": 1})
    apply(kubectl, namespace, finetunejob("flaky", spec))
    status = wait_phase(kubectl, namespace, "flaky", {"Succeeded", "Failed"}, 180)
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "TrainerError"
    assert "exited with code 1" in condition(status, "Failed")["message"]
    assert status["attempts"] == 2
    assert len(pods_of(kubectl, namespace, "flaky")) == 2


# --- a tenant who may only create FineTuneJobs ---------------------------------------------------

TENANT = "tenant@example.com"
TOKEN_VALUE = "hf_tenant-must-never-see-this-0123456789"


class RecordingDatasetServer(LoopbackServer):
    """An http server on ``host`` that serves one dataset file and records every request."""

    def __init__(self, payload: bytes, host: str) -> None:
        import http.server

        self.requests: list[dict[str, Any]] = []
        recorder = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.append({"path": self.path, "headers": dict(self.headers.items())})
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                return

        super().__init__(Handler, host)


@pytest.fixture
def tenant(kubectl: Kubectl, namespace: str) -> str:
    """A user whose only right in ``namespace`` is to create and read FineTuneJobs."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "finetunejob-creator"},
        "rules": [
            {
                "apiGroups": ["kubetune.io"],
                "resources": ["finetunejobs"],
                "verbs": ["create", "get", "list", "watch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "finetunejob-creator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "finetunejob-creator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}],
    }  # fmt: skip
    apply(kubectl, namespace, role)
    apply(kubectl, namespace, binding)
    return TENANT


def as_tenant(kubectl: Kubectl, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return kubectl("--as", TENANT, *args, **kwargs)


def test_a_tenant_who_may_only_create_finetunejobs_gets_no_more_than_a_trainer_pod(
    operator: OperatorProcess,
    local_cluster: ClusterHandle,
    kubectl: Kubectl,
    namespace: str,
    tenant: str,
    tiny_assets: Path,
    trainer_status_policy: None,
    references_policy: None,
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"},
              "stringData": {"token": TOKEN_VALUE + "\n"}}  # fmt: skip
    apply(kubectl, namespace, secret)
    for verb, resource in (("get", "secrets"), ("create", "pods"), ("create", "jobs"),
                           ("patch", "finetunejobs/status"), ("get", "pods/log")):  # fmt: skip
        allowed = as_tenant(kubectl, "auth", "can-i", verb, resource, "-n", namespace, check=False)
        assert allowed.stdout.strip() == "no", (verb, resource)

    # A hostile spec: host access, another identity, its own command and image.
    hostile = sleeper_spec(1)
    hostile["image"] = "attacker.example/trainer:latest"
    hostile["podTemplate"]["spec"].update(
        hostPID=True,
        hostNetwork=True,
        nodeName=REAL_NODE,
        serviceAccountName="victim-trainer",
        securityContext={"runAsUser": 0},
        volumes=[{"name": "host", "hostPath": {"path": "/"}}],
    )
    hostile["podTemplate"]["spec"]["containers"][0].update(
        command=["sh", "-c", "cat /var/run/secrets/kubernetes.io/serviceaccount/token"],
        securityContext={"privileged": True},
        volumeMounts=[{"name": "host", "mountPath": "/host"}],
    )
    as_tenant(kubectl, "apply", "-n", namespace, "-f", "-",
              input=json.dumps(finetunejob("escape", hostile)))  # fmt: skip
    status = wait_phase(kubectl, namespace, "escape", {"Failed"}, 60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "Denied"
    for field in ("spec.image", "spec.podTemplate.spec.hostPID", "spec.podTemplate.spec.hostNetwork",
                  "spec.podTemplate.spec.nodeName", "spec.podTemplate.spec.serviceAccountName",
                  "spec.podTemplate.spec.securityContext", "spec.podTemplate.spec.volumes",
                  "spec.podTemplate.spec.containers[0].command",
                  "spec.podTemplate.spec.containers[0].securityContext"):  # fmt: skip
        assert field in failed["message"], field
    assert jobs_of(kubectl, namespace, component=None) == []
    assert get_json(kubectl, "pods", "-n", namespace)["items"] == []

    # A forged result: the tenant can't write status at all.
    forged = as_tenant(kubectl, "patch", "ftj", "escape", "-n", namespace, "--subresource=status",
                       "--type=merge", "-p", '{"status": {"phase": "Succeeded"}}', check=False)  # fmt: skip
    assert forged.returncode != 0 and "forbidden" in forged.stderr.lower()

    # What the job would read, the tenant must be allowed to read: the hub Secret and the claim
    # are refused at create by the apiserver (the chart's admission policy), naming the field.
    volume = work_claim(kubectl, namespace)
    shutil.copytree(tiny_assets / "model", volume / "model")
    dataset = (tiny_assets / "data" / "reverse-prompt-completion.jsonl").read_bytes()
    # The tenant's host: a server of this machine on the real node's link, behind a Service.
    link = real_node_state(local_cluster.local().layout.home).host_address
    server = RecordingDatasetServer(dataset, link)
    address = host_service(kubectl, f"dataset-{server.port}", link, server.port)
    try:
        url = f"http://{address}:{server.port}"
        spec = tiny_training_spec(f"{url}/train.jsonl?sig=tenant-chosen")
        spec["model"]["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
        honest = json.dumps(finetunejob("honest-run", spec))

        def create_as_tenant(dry_run: bool = False) -> subprocess.CompletedProcess[str]:
            extra = ["--dry-run=server"] if dry_run else []
            return as_tenant(kubectl, "create", "-n", namespace, *extra, "-f", "-",
                             input=honest, check=False)  # fmt: skip

        # An admission policy takes effect once the apiserver has loaded it (a dry run is
        # admitted like a real request, without side effects).
        wait_for(lambda: create_as_tenant(dry_run=True).returncode != 0, 60,
                 "the references policy to take effect")  # fmt: skip
        refused = create_as_tenant()
        assert refused.returncode != 0
        assert "spec.model.tokenSecretRef: you may not get Secret hf-token" in refused.stderr
        # The apiserver names the first reference refused: without the Secret, the claim.
        without_token = json.loads(honest)
        del without_token["spec"]["model"]["tokenSecretRef"]
        refused = as_tenant(kubectl, "create", "-n", namespace, "-f", "-",
                            input=json.dumps(without_token), check=False)  # fmt: skip
        assert refused.returncode != 0
        assert f"spec.model.uri: you may not get PersistentVolumeClaim {CLAIM}" in refused.stderr
        assert as_tenant(kubectl, "get", "ftj", "honest-run", "-n", namespace,
                         check=False).returncode != 0  # fmt: skip

        # Allowed to read that Secret and that claim, the same job is accepted.
        reader = {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tenant-reads-its-own"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["hf-token"],
                       "verbs": ["get"]},
                      {"apiGroups": [""], "resources": ["persistentvolumeclaims"],
                       "resourceNames": [CLAIM], "verbs": ["get"]}],
        }  # fmt: skip
        apply(kubectl, namespace, reader)
        apply(kubectl, namespace, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "tenant-reads-its-own"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "tenant-reads-its-own"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}],
        })  # fmt: skip
        # RBAC changes reach the authorizer through its informer: wait for the dry run to pass.
        wait_for(lambda: create_as_tenant(dry_run=True).returncode == 0, 60,
                 "the tenant's read rights to take effect")  # fmt: skip
        created = create_as_tenant()
        assert created.returncode == 0, created.stderr
        status = wait_phase(kubectl, namespace, "honest-run", {"Succeeded", "Failed"}, 600)
    finally:
        server.close()
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert server.requests, "the dataset was never fetched from the tenant's host"
    assert TOKEN_VALUE not in json.dumps(server.requests)
    assert not any("authorization" in {h.lower() for h in r["headers"]} for r in server.requests)

    (pod,) = pods_of(kubectl, namespace, "honest-run")
    pod_spec = pod["spec"]
    assert pod_spec["serviceAccountName"] == "default"
    assert pod_spec["automountServiceAccountToken"] is False
    assert not pod_spec.get("hostPID") and not pod_spec.get("hostNetwork")
    assert all("hostPath" not in v for v in pod_spec["volumes"])
    (trainer,) = pod_spec["containers"]
    assert trainer["command"][0] == "kubetune-stand-in-trainer"
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False

    # The token is nowhere the tenant (or anyone reading status, events, logs, output) can read.
    seen_by_tenant = as_tenant(kubectl, "get", "ftj", "-n", namespace, "-o", "json").stdout
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    logs = kubectl("logs", pod["metadata"]["name"], "-n", namespace).stdout
    outputs = "".join(
        p.read_text(errors="replace") for p in (volume / "adapter").rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".txt", "")
    )  # fmt: skip
    for where, text in (("status", seen_by_tenant), ("events", events), ("logs", logs),
                        ("output", outputs)):  # fmt: skip
        assert TOKEN_VALUE not in text, where
    # A query string may carry credentials (presigned URLs): it stays out of what kubetune writes.
    assert "tenant-chosen" not in json.dumps(status["result"]) + outputs


def test_a_job_named_like_someone_elses_job_fails_and_never_touches_it(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "taken"},
        "spec": {
            "suspend": True,
            "template": {"spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "c", "command": ["true"], "image": "x"}]}},
        },
    }  # fmt: skip
    apply(kubectl, namespace, foreign)
    # Without the Validating phase the trainer Job is created at once, and the clash shows then.
    # (With it, the clash shows when the trainer Job is created, after validation.)
    spec = sleeper_spec(1, runPolicy={"suspend": True}, validation={"enabled": False})
    apply(kubectl, namespace, finetunejob("taken", spec))
    status = wait_phase(kubectl, namespace, "taken", {"Failed"}, 60)
    assert condition(status, "Failed")["reason"] == "NameConflict"
    assert "Job taken exists and is not owned" in condition(status, "Failed")["message"]

    kubectl("patch", "ftj", "taken", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false, "activeDeadlineSeconds": 5}}}')  # fmt: skip
    time.sleep(5)  # what a wrongly acting operator would have done by now, it would have done
    job = get_json(kubectl, "job", "taken", "-n", namespace)
    assert job["spec"]["suspend"] is True
    assert "activeDeadlineSeconds" not in job["spec"]
    assert not job["metadata"].get("ownerReferences")
    for kind in ("configmap", "networkpolicy"):
        left = get_json(kubectl, kind, "-n", namespace, "-l", "kubetune.io/job=taken")["items"]
        assert left == [], f"a {kind} of the refused job was left behind"


#: A trainer image that no node holds.
ABSENT_IMAGE = "kubetune/trainer:absent"


def test_a_trainer_image_the_node_does_not_have_keeps_the_job_pending_image_pull_back_off(
    operator: OperatorProcess,
    kubectl: Kubectl,
    kubeconfig_path: Path,
    namespace: str,
    real_node: str,
    tmp_path: Path,
) -> None:
    """The real node pulls nothing (it reaches no registry): an operator whose trainer image
    isn't in its containerd gets a job whose kubelet reports a failed pull."""
    operator.stop()  # the operator of this test, with that image, is the only one acting
    # Pulled if not present (a pull fails here), not Never (ErrImageNeverPull, no back-off).
    env = {"KUBETUNE_TRAINER_IMAGE": ABSENT_IMAGE, "KUBETUNE_IMAGE_PULL_POLICY": "IfNotPresent"}
    absent = OperatorProcess(kubeconfig_path, tmp_path / "log", env=env)
    absent.start()
    try:
        placement = on_real_node()
        # No Validating phase: its Job would wait for the same image.
        spec = sleeper_spec(1, validation={"enabled": False}, scheduling={
            "nodeSelector": placement["nodeSelector"], "tolerations": placement["tolerations"],
        })  # fmt: skip
        apply(kubectl, namespace, finetunejob("no-image", spec))
        status = wait_ready_reason(kubectl, namespace, "no-image", "ImagePullBackOff", 120)
        assert status["phase"] == "Pending"
        assert ABSENT_IMAGE in condition(status, "Ready")["message"]
        wait_for(
            lambda: "ImagePullBackOff" in event_reasons(kubectl, namespace, "no-image"),
            30,
            "an ImagePullBackOff event on the FineTuneJob",
        )
    finally:
        print(f"--- the absent image's operator (tail) ---\n{absent.log_tail(40)}")
        absent.stop()
        operator.start()


# --- multi-pod groups (resources.nodes > 1) ------------------------------------------------------


def group_spec(plan: str, backoff_limit: int) -> dict[str, Any]:
    spec = sleeper_spec(0, resources={"gpus": 0, "nodes": 2, "shmSize": "64Mi"},
                        runPolicy={"backoffLimit": backoff_limit})  # fmt: skip
    spec["podTemplate"]["spec"]["containers"][0]["env"][0]["value"] = plan
    return spec


def live_ranks(kubectl: Kubectl, namespace: str, name: str) -> dict[int, dict[str, Any]]:
    return {
        int(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]): p
        for p in pods_of(kubectl, namespace, name)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    }


def test_a_two_pod_group_restarts_whole_when_one_pod_is_lost_counting_one_attempt(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("group", group_spec("sleep:600", backoff_limit=1)))
    both = "2 of 2 pods"
    first = wait_status(kubectl, namespace, "group",
                        lambda s: both in condition(s, "Ready").get("message", ""), 120,
                        "both pods running")  # fmt: skip
    (job,) = jobs_of(kubectl, namespace)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    service = get_json(kubectl, "service", job["spec"]["template"]["spec"]["subdomain"],
                       "-n", namespace)  # fmt: skip
    assert service["spec"]["clusterIP"] == "None"
    ranks = wait_for(lambda: (r := live_ranks(kubectl, namespace, "group")) and len(r) == 2 and r,
                     60, "both ranks running")  # fmt: skip
    assert (first["attempts"], first["worldSize"]) == (1, 2)
    assert first["podName"] == ranks[0]["metadata"]["name"]
    wide = kubectl("get", "ftj", "group", "-n", namespace, "-o", "wide").stdout.splitlines()
    at = wide[0].index("RANKS")  # empty columns (no loss yet) leave blanks: read by position
    assert wide[1][at:].split()[0] == "2"

    # Rank 1's pod is lost: the whole group starts again, as the next attempt's Job.
    kubectl("delete", "pod", ranks[1]["metadata"]["name"], "-n", namespace, "--wait=false")
    wait_ready_reason(kubectl, namespace, "group", "Retrying", 60)
    second = wait_status(kubectl, namespace, "group",
                         lambda s: s.get("attempts") == 2 and both in condition(s, "Ready").get(
                             "message", ""), 120, "the second attempt running")  # fmt: skip
    (again,) = jobs_of(kubectl, namespace)
    assert again["metadata"]["uid"] != job["metadata"]["uid"]
    assert again["metadata"]["annotations"]["kubetune.io/attempt"] == "2"
    new_ranks = wait_for(
        lambda: (r := live_ranks(kubectl, namespace, "group")) and len(r) == 2 and r, 60,
        "both ranks of the second attempt running")  # fmt: skip
    assert {p["metadata"]["name"] for p in new_ranks.values()}.isdisjoint(
        p["metadata"]["name"] for p in ranks.values()
    ), "the surviving rank must restart with the group"
    assert second["phase"] == "Running"

    # backoffLimit 1: the second lost pod fails the job, after two attempts in all.
    kubectl("delete", "pod", new_ranks[0]["metadata"]["name"], "-n", namespace, "--wait=false")
    final = wait_phase(kubectl, namespace, "group", {"Failed"}, 120)
    assert final["attempts"] == 2
    assert "Retrying" in event_reasons(kubectl, namespace, "group")


def test_a_non_retriable_exit_on_one_rank_fails_the_group_at_once_naming_that_rank(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    plan = "sleep:600@0,sleep:2@1,exit:3@1"
    apply(kubectl, namespace, finetunejob("bad-rank", group_spec(plan, backoff_limit=3)))
    status = wait_phase(kubectl, namespace, "bad-rank", {"Failed", "Succeeded"}, 120)
    failed = condition(status, "Failed")
    assert (status["phase"], failed["reason"], status["attempts"]) == ("Failed", "DatasetError", 1)
    assert failed["message"].startswith("node rank 1: ")
    (job,) = jobs_of(kubectl, namespace)
    assert job["metadata"]["annotations"]["kubetune.io/attempt"] == "1"
