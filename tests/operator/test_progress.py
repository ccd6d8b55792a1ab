"""Progress without an API identity, against the real apiserver: a trainer pod mounts no
Kubernetes API token; it reports to the operator's progress endpoint (HTTPS) with a projected
token of kubetune's audience bound to the pod, which the operator checks with a real
TokenReview before it writes ``status.progress``. And what one job costs the API.

Each test runs its own operator, watching only the test's namespace, holding a Lease there.
Trainers are the stand-in (``progress:STEP`` reports through the trainer's own reporter).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operatorkit import CRD, OperatorProcess, log_tail_after, progress_tls, started, work_claim
from test_operator_integration import (
    _cluster_endpoint,
    _patch_status_as,
    apply,
    event_reasons,
    finetunejob,
    ftj_status,
    pods_of,
    sleeper_spec,
    wait_phase,
    wait_status,
)

from kubetune_devtools.pytest_plugin import Kubectl, install_crd, wait_for

pytestmark = pytest.mark.integration

AUDIENCE = "kubetune.io/progress"
#: The goal of the operator's second design (issue #25): API requests per job from create to
#: Succeeded, the Validating phase on, progress and Lease renewals excluded.
REQUESTS_PER_JOB = 8


@pytest.fixture
def operator(
    kubectl: Kubectl, kubeconfig_path: Path, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    install_crd(kubectl, CRD)
    env = {"KUBETUNE_LEASE_NAMESPACE": namespace, "KUBETUNE_LEASE_NAME": "kubetune-test"}
    process = OperatorProcess(kubeconfig_path, tmp_path / "log", ["--namespace", namespace], env)
    yield from started(process)


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


def reporting_spec(plan: str, **extra: Any) -> dict[str, Any]:
    """A stand-in trainer that follows ``plan`` (``progress:STEP``, ``sleep:S``, ``until:PATH``)."""
    spec = sleeper_spec(0, **extra)
    spec["podTemplate"]["spec"]["containers"][0]["env"][0]["value"] = plan
    return spec


def progress_step(kubectl: Kubectl, namespace: str, name: str) -> int | None:
    step = (ftj_status(kubectl, namespace, name).get("progress") or {}).get("step")
    return int(step) if step is not None else None


def wait_progress(kubectl: Kubectl, namespace: str, name: str, step: int, timeout: float) -> None:
    wait_status(
        kubectl,
        namespace,
        name,
        lambda s: (s.get("progress") or {}).get("step") == step,
        timeout,
        f"status.progress.step {step}",
    )


def running_pod(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        pods = [
            p for p in pods_of(kubectl, namespace, name) if p["status"].get("phase") == "Running"
        ]
        return pods[0] if pods else None

    pod: dict[str, Any] = wait_for(running, 120, f"{name}'s trainer pod to run")
    return pod


def token_for(
    kubectl: Kubectl, namespace: str, pod: dict[str, Any], audience: str | None = AUDIENCE
) -> str:
    """A token of the pod's ServiceAccount bound to the pod, as the kubelet projects one."""
    meta, account = pod["metadata"], pod["spec"]["serviceAccountName"]
    audiences = ["--audience", audience] if audience else []
    return str(
        kubectl(
            "create", "token", account, "-n", namespace, *audiences, "--duration", "10m",
            "--bound-object-kind", "Pod", "--bound-object-name", meta["name"],
            "--bound-object-uid", meta["uid"],
        ).stdout.strip()
    )  # fmt: skip


def post_progress(
    operator: OperatorProcess, token: str, namespace: str, name: str, step: int
) -> int:
    body = {"job": {"namespace": namespace, "name": name}, "progress": {"step": step}}
    request = urllib.request.Request(
        operator.host_progress_url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cadata=progress_tls().ca_pem)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def accepted_by_the_leader(
    operator: OperatorProcess, token: str, namespace: str, name: str, step: int
) -> int:
    """POST until the replica answers as the leader does (not 503: it took the Lease)."""
    codes: list[int] = []

    def answered() -> bool:
        codes.append(post_progress(operator, token, namespace, name, step))
        return codes[-1] != 503

    wait_for(answered, 60, "the operator to hold its Lease")
    return codes[-1]


def test_a_trainer_pod_has_no_api_token_and_its_progress_reaches_the_status(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("reporter", reporting_spec("progress:7,sleep:300")))
    wait_progress(kubectl, namespace, "reporter", 7, 120)

    pod = running_pod(kubectl, namespace, "reporter")
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "default"  # the namespace's: nothing made per job
    tokens = [
        source["serviceAccountToken"]
        for volume in spec["volumes"]
        for source in (volume.get("projected") or {}).get("sources") or []
        if "serviceAccountToken" in source
    ]
    assert [t["audience"] for t in tokens] == [AUDIENCE]  # no token the apiserver accepts
    mounts = [m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts") or []]
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in mounts
    kinds = {"serviceaccounts", "roles", "rolebindings"}
    for kind in kinds:
        made = json.loads(kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]
        assert [o for o in made if o["metadata"]["name"] != "default"] == [], kind


def test_the_trainers_account_may_not_write_status_through_the_api(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, finetunejob("quiet", reporting_spec("sleep:300")))
    pod = running_pod(kubectl, namespace, "quiet")
    api_token = token_for(kubectl, namespace, pod, audience=None)  # the apiserver's audience
    server, context = _cluster_endpoint(kubectl)
    assert _patch_status_as(server, context, api_token, namespace, "quiet") == 403
    # And its progress token is no API token at all.
    progress_token = token_for(kubectl, namespace, pod)
    assert _patch_status_as(server, context, progress_token, namespace, "quiet") == 401
    assert "progress" not in ftj_status(kubectl, namespace, "quiet")


def test_a_token_of_another_audience_or_of_another_jobs_pod_changes_nothing(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    for name in ("mine", "theirs"):
        apply(kubectl, namespace, finetunejob(name, reporting_spec("sleep:300")))
    mine, theirs = (running_pod(kubectl, namespace, n) for n in ("mine", "theirs"))

    wrong_audience = token_for(kubectl, namespace, mine, audience="https://kubernetes.default.svc")
    assert accepted_by_the_leader(operator, wrong_audience, namespace, "mine", 66) == 401
    other_pod = token_for(kubectl, namespace, theirs)
    assert post_progress(operator, other_pod, namespace, "mine", 66) == 403
    assert post_progress(operator, "not-a-token", namespace, "mine", 66) == 401
    assert post_progress(operator, "", namespace, "mine", 66) == 401
    # Its own pod's token writes its own job's progress; the refused reports never did.
    own = token_for(kubectl, namespace, mine)
    assert post_progress(operator, own, namespace, "mine", 5) == 202
    wait_progress(kubectl, namespace, "mine", 5, 60)
    assert progress_step(kubectl, namespace, "theirs") is None
    log = operator.log_path.read_text()
    assert all(token not in log for token in (wrong_audience, other_pod, own))


def test_progress_sent_while_the_operator_is_away_reaches_the_status_after_it_restarts(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    claim = work_claim(kubectl, namespace)
    go = claim / "go"
    spec = reporting_spec(
        "progress:1,until:/mnt/pvc/work/go,progress:2,sleep:300",
        model={"uri": "pvc://work/model"},
    )
    apply(kubectl, namespace, finetunejob("restarted", spec))
    wait_progress(kubectl, namespace, "restarted", 1, 120)
    pod = running_pod(kubectl, namespace, "restarted")["metadata"]["name"]

    operator.kill()
    go.write_text("")

    def refused() -> bool:
        logs = kubectl("logs", "-n", namespace, pod, check=False)
        return "could not report progress to the operator" in logs.stdout + logs.stderr

    wait_for(refused, 60, "the trainer to find the operator away")
    assert progress_step(kubectl, namespace, "restarted") == 1
    operator.start()
    wait_progress(kubectl, namespace, "restarted", 2, 120)


def api_requests(operator: OperatorProcess) -> dict[str, float]:
    """The operator's kubetune_api_requests_total by resource, without the Lease's renewals and
    the progress tokens' reviews (neither is a job's)."""
    counts: dict[str, float] = {}
    for series, value in operator.metrics().items():
        if not series.startswith("kubetune_api_requests_total{"):
            continue
        labels = dict(part.split("=", 1) for part in series[series.index("{") + 1 : -1].split(","))
        resource = labels["resource"].strip('"')
        if resource in ("leases", "tokenreviews"):
            continue
        key = f"{labels['verb'].strip(chr(34))} {resource}"
        counts[key] = counts.get(key, 0.0) + value
    return counts


def scraped(operator: OperatorProcess) -> tuple[dict[str, float]] | None:
    try:
        return (api_requests(operator),)
    except OSError:
        return None  # not serving yet


def test_a_validated_job_costs_at_most_eight_api_requests_from_create_to_succeeded(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    names = [f"counted-{i}" for i in range(3)]
    before = wait_for(lambda: scraped(operator), 60, "the operator's /metrics")[0]
    for name in names:
        apply(kubectl, namespace, finetunejob(name, sleeper_spec(1)))
    for name in names:
        status = wait_phase(kubectl, namespace, name, {"Succeeded", "Failed"}, 180)
        assert status["phase"] == "Succeeded", status
    for name in names:
        wait_for(lambda n=name: "Succeeded" in event_reasons(kubectl, namespace, n), 60,
                 f"{name}'s Succeeded event")  # fmt: skip
    after = api_requests(operator)
    spent = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    per_job = sum(spent.values()) / len(names)
    print(f"API requests per job: {per_job:.2f} ({spent})")
    assert per_job <= REQUESTS_PER_JOB, spent
