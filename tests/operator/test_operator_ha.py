"""Two operator replicas on one Lease, and what /metrics shows, against the real control plane.

Both replicas watch only the test's namespace and hold the Lease there, so nothing else on the
cluster competes with them. Jobs run the stand-in trainer: seconds, no ML.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from operatorkit import CRD, OperatorProcess, work_claim
from test_operator_integration import (
    apply,
    event_reasons,
    finetunejob,
    jobs_of,
    sleeper_spec,
    unschedulable_spec,
    wait_phase,
)
from test_progress import reporting_spec, wait_progress

from kubetune.local.ports import free_port
from kubetune_devtools.pytest_plugin import Kubectl, get_json, wait_for

pytestmark = pytest.mark.integration

#: Short, so the suite stays quick; KUBETUNE_TEST_LEASE_SECONDS=10 KUBETUNE_TEST_RENEW_SECONDS=2
#: measures the chart's defaults (docs/performance.md).
LEASE_SECONDS = int(os.environ.get("KUBETUNE_TEST_LEASE_SECONDS", "4"))
RENEW_SECONDS = float(os.environ.get("KUBETUNE_TEST_RENEW_SECONDS", "1"))
#: Takeover: the Lease runs out, the next look (every renew period) takes it; slack for a busy
#: 2-core machine.
TAKEOVER_DEADLINE = LEASE_SECONDS + 2 * RENEW_SECONDS + 6


@pytest.fixture
def replicas(
    kubectl: Kubectl, kubeconfig_path: Path, namespace: str, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    env = {
        "KUBETUNE_LEASE_NAMESPACE": namespace,
        "KUBETUNE_LEASE_NAME": "kubetune-test",
        "KUBETUNE_LEASE_DURATION_SECONDS": str(LEASE_SECONDS),
        "KUBETUNE_LEASE_RENEW_SECONDS": str(RENEW_SECONDS),
    }
    # One progress port for both (SO_REUSEPORT), as the chart's Service fronts both replicas:
    # the standby answers 503 and the trainer tries again.
    port = free_port()
    processes = [
        OperatorProcess(
            kubeconfig_path,
            tmp_path / f"operator-{i}.log",
            ["--namespace", namespace],
            env,
            progress_port=port,
        )
        for i in range(2)
    ]
    yield processes
    for process in processes:
        print(f"--- {process.log_path.name} (tail) ---\n{process.log_tail(40)}")
        process.stop()


def leader_gauge(process: OperatorProcess) -> float | None:
    """kubetune_leader of ``process``; None until it serves /metrics."""
    try:
        return process.metrics().get("kubetune_leader")
    except OSError:
        return None


def leader_of(process: OperatorProcess) -> bool:
    return leader_gauge(process) == 1.0


def lease_holder(kubectl: Kubectl, namespace: str) -> str:
    lease = get_json(kubectl, "lease", "kubetune-test", "-n", namespace)
    return str(lease["spec"].get("holderIdentity") or "")


def start_leader_and_standby(
    replicas: list[OperatorProcess],
) -> tuple[OperatorProcess, OperatorProcess]:
    """Start the first replica, wait till it leads, then the second, till it stands by; both."""
    first, second = replicas
    first.start()
    wait_for(lambda: leader_of(first), 60, "the first replica to take the Lease")
    second.start()
    wait_for(lambda: leader_gauge(second) == 0.0, 60, "the second to stand by")
    return first, second


def test_one_replica_acts_and_the_other_takes_over_when_it_is_killed(
    replicas: list[OperatorProcess], kubectl: Kubectl, namespace: str
) -> None:
    first, second = start_leader_and_standby(replicas)

    apply(kubectl, namespace, finetunejob("ha", sleeper_spec(8)))
    wait_phase(kubectl, namespace, "ha", {"Running"}, 90)
    (job,) = jobs_of(kubectl, namespace)
    holder = lease_holder(kubectl, namespace)
    assert not leader_of(second)

    first.kill()
    killed = time.monotonic()
    wait_for(lambda: leader_of(second), TAKEOVER_DEADLINE, "the second replica to take over")
    takeover = time.monotonic() - killed
    print(f"takeover after {takeover:.1f}s (Lease {LEASE_SECONDS}s, renew {RENEW_SECONDS}s)")
    assert lease_holder(kubectl, namespace) != holder

    status = wait_phase(kubectl, namespace, "ha", {"Succeeded", "Failed"}, 90)
    assert status["phase"] == "Succeeded"
    assert [j["metadata"]["uid"] for j in jobs_of(kubectl, namespace)] == [job["metadata"]["uid"]]
    reasons = event_reasons(kubectl, namespace, "ha")
    assert "Succeeded" in reasons  # the transition after the takeover was not lost
    assert reasons.count("Succeeded") == 1


def test_progress_reaches_the_status_through_the_shared_port_and_after_a_takeover(
    replicas: list[OperatorProcess], kubectl: Kubectl, namespace: str
) -> None:
    """Trainers report to a port both replicas serve: the standby answers 503, the trainer tries
    again until the leader takes it, and after a takeover the new leader does."""
    first, second = start_leader_and_standby(replicas)
    claim = work_claim(kubectl, namespace)
    plan = "progress:1,until:/mnt/pvc/work/go,progress:2,sleep:300"
    apply(
        kubectl, namespace, finetunejob("told", reporting_spec(plan, model={"uri": "pvc://work/m"}))
    )
    wait_progress(kubectl, namespace, "told", 1, 120)

    first.kill()
    wait_for(lambda: leader_of(second), TAKEOVER_DEADLINE, "the second replica to take over")
    (claim / "go").write_text("")
    wait_progress(kubectl, namespace, "told", 2, 120)


def test_a_replica_stopped_cleanly_hands_over_at_once(
    replicas: list[OperatorProcess], kubectl: Kubectl, namespace: str
) -> None:
    first, second = start_leader_and_standby(replicas)
    first.stop()  # SIGTERM: the Lease is given up
    stopped = time.monotonic()
    wait_for(lambda: leader_of(second), TAKEOVER_DEADLINE, "the second replica to take over")
    assert time.monotonic() - stopped < LEASE_SECONDS + 3 * RENEW_SECONDS
    apply(kubectl, namespace, finetunejob("after", unschedulable_spec()))
    wait_phase(kubectl, namespace, "after", {"Pending"}, 60)


def test_metrics_show_phases_transitions_reconciles_and_progress_until_the_job_goes(
    replicas: list[OperatorProcess], kubectl: Kubectl, namespace: str
) -> None:
    operator = replicas[0]
    operator.start()
    wait_for(lambda: leader_of(operator), 60, "the replica to take the Lease")
    apply(kubectl, namespace, finetunejob("watched", unschedulable_spec()))
    wait_phase(kubectl, namespace, "watched", {"Pending"}, 60)
    progress = {"step": 7, "percent": 35.0, "loss": 1.5, "tokensPerSecond": 900.0, "etaSeconds": 42}
    kubectl(
        "patch", "ftj", "watched", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"progress": progress}}),
    )  # fmt: skip
    series = f'name="watched",namespace="{namespace}"'

    def scraped() -> dict[str, float] | None:
        samples = operator.metrics()
        return samples if f"kubetune_finetunejob_progress_step{{{series}}}" in samples else None

    samples = wait_for(scraped, 30, "the progress gauges")
    assert samples[f"kubetune_finetunejob_progress_loss{{{series}}}"] == 1.5
    assert samples[f"kubetune_finetunejob_progress_tokens_per_second{{{series}}}"] == 900.0
    assert samples[f"kubetune_finetunejob_progress_eta_seconds{{{series}}}"] == 42.0
    assert samples['kubetune_finetunejobs{phase="Pending"}'] >= 1
    assert samples['kubetune_phase_transitions_total{from_phase="New",to_phase="Pending"}'] >= 1
    assert samples["kubetune_reconcile_duration_seconds_count"] >= 1
    assert any(key.startswith("kubetune_api_requests_total{") for key in samples)
    assert "process_resident_memory_bytes" in samples
    # the status the operator wrote never dropped what the trainer wrote
    status = get_json(kubectl, "ftj", "watched", "-n", namespace)["status"]
    assert status["progress"]["step"] == 7

    kubectl("delete", "ftj", "watched", "-n", namespace, "--wait=true")
    wait_for(
        lambda: not any("watched" in key for key in operator.metrics()),
        30,
        "the job's series to go",
    )
