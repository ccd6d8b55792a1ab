"""derive_status: what the Job and its Pods say → the FineTuneJob's phase, conditions and result."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.operator.pods import parse_termination_message
from kubetune.operator.status import (
    derive_status,
    set_condition,
    set_conditions,
    transition,
    ttl_remaining,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EARLIER = "2026-01-02T02:00:00Z"

RESULT = {
    "outcome": "Succeeded",
    "reason": "Succeeded",
    "message": "trained 10 steps",
    "adapter": {"uri": "pvc://adapters/run-1", "sha256": "ab" * 32, "sizeBytes": 12345},
    "baseModel": {"uri": "pvc://models/tiny", "revision": "main"},
    "metrics": {"train_loss": 1.25},
}


def ftj(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "run-1", "namespace": "ns", "generation": 2, "uid": "u"},
        "spec": spec,
        "status": status or {},
    }


def job(*conditions: tuple[str, str, str], suspend: bool = False, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "run-1"},
        "spec": {"suspend": suspend},
        "status": {
            **status,
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions
            ],
        },
    }


def pod(
    phase: str,
    *,
    created: str = EARLIER,
    state: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    started: bool = True,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    if started:
        status["startTime"] = created
    return {
        "metadata": {"name": f"run-1-{created[-9:-1]}", "creationTimestamp": created},
        "status": status,
    }


def terminated(code: int, message: str = "", reason: str = "Error") -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "startedAt": EARLIER,
            "finishedAt": "2026-01-02T02:10:00Z",
        }
    }


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in status["conditions"] if c["type"] == type_)
    return found


def failed_job(reason: str, message: str = "") -> dict[str, Any]:
    return job(("Failed", reason, message), failed=1)


def test_job_without_pods_yet_is_pending_starting() -> None:
    status = derive_status(ftj(), job(), [], NOW)
    assert status["phase"] == "Pending"
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Ready")["reason"] == "Starting"
    assert status["jobName"] == "run-1"
    assert status["observedGeneration"] == 2
    assert status["attempts"] == 0


def test_running_trainer_is_running_and_ready() -> None:
    running = pod("Running", state={"running": {"startedAt": "2026-01-02T02:01:00Z"}})
    status = derive_status(ftj(), job(active=1), [running], NOW)
    assert status["phase"] == "Running"
    assert condition(status, "Running")["status"] == "True"
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Succeeded")["status"] == "False"
    assert condition(status, "Failed")["status"] == "False"
    assert status["startTime"] == "2026-01-02T02:01:00Z"
    assert status["attempts"] == 1


def test_finished_trainer_before_the_job_completes_stays_running() -> None:
    done = pod("Succeeded", state=terminated(0, reason="Completed"))
    status = derive_status(ftj(), job(), [done], NOW)
    assert status["phase"] == "Running"
    assert condition(status, "Running")["reason"] == "Finishing"


def test_replacement_of_an_evicted_pod_counts_as_another_attempt() -> None:
    first = derive_status(ftj(), job(active=1), [pod("Running", created=EARLIER,
                          state={"running": {"startedAt": EARLIER}})], NOW)  # fmt: skip
    assert (first["attempts"], first["podName"]) == (1, "run-1-02:00:00")
    # The evicted pod is gone; the Job (whose podFailurePolicy ignored it) runs a new one.
    later = "2026-01-02T02:05:00Z"
    replacement = pod("Running", created=later, state={"running": {"startedAt": later}})
    second = derive_status(ftj(status=first), job(active=1), [replacement], NOW)
    assert second["attempts"] == 2
    assert second["podName"] == "run-1-02:05:00"
    again = derive_status(ftj(status=second), job(active=1), [replacement], NOW)
    assert again["attempts"] == 2


def test_unschedulable_pod_says_why_with_the_schedulers_message() -> None:
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    unschedulable = pod(
        "Pending",
        started=False,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ],
    )
    status = derive_status(ftj(), job(active=1), [unschedulable], NOW)
    assert status["phase"] == "Pending"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "False",
        "Unschedulable",
        message,
    )
    assert status["attempts"] == 0


@pytest.mark.parametrize("waiting", ["ImagePullBackOff", "ErrImagePull"])
def test_image_that_cannot_be_pulled_is_named(waiting: str) -> None:
    stuck = pod(
        "Pending", state={"waiting": {"reason": waiting, "message": 'pull "nope:1" failed'}}
    )
    status = derive_status(ftj(), job(active=1), [stuck], NOW)
    assert status["phase"] == "Pending"
    assert condition(status, "Ready")["reason"] == "ImagePullBackOff"
    assert "nope:1" in condition(status, "Ready")["message"]


def test_completed_job_succeeds_with_the_trainers_result() -> None:
    done = pod("Succeeded", state=terminated(0, json.dumps(RESULT), reason="Completed"))
    status = derive_status(
        ftj(),
        job(("Complete", "", ""), succeeded=1, completionTime="2026-01-02T02:10:00Z"),
        [done],
        NOW,
    )
    assert status["phase"] == "Succeeded"
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    assert status["result"]["adapter"] == RESULT["adapter"]
    assert status["result"]["metrics"] == {"train_loss": 1.25}
    assert status["completionTime"] == "2026-01-02T02:10:00Z"
    assert status["startTime"] == EARLIER
    assert status["attempts"] == 1


def test_a_nan_metric_is_left_out_so_the_status_stays_writable() -> None:
    # Python's json writes NaN; the Kubernetes API refuses a status holding one, and the job
    # would never show Succeeded. Older trainers (and any pod's own code) may write it.
    message = json.dumps({**RESULT, "metrics": {"train_loss": 1.25, "eval_loss": float("nan")}})
    done = pod("Succeeded", state=terminated(0, message, reason="Completed"))
    status = derive_status(ftj(), job(("Complete", "", ""), succeeded=1), [done], NOW)
    assert status["phase"] == "Succeeded"
    assert status["result"]["adapter"] == RESULT["adapter"]
    assert status["result"]["metrics"] == {"train_loss": 1.25}
    json.dumps(status, allow_nan=False)


@pytest.mark.parametrize(
    ("exit_code", "reason"),
    [(2, "InvalidConfig"), (3, "DatasetError"), (4, "ModelError"), (5, "OutOfMemory")],
)
def test_non_retriable_exit_codes_fail_with_their_reason(exit_code: int, reason: str) -> None:
    failed = pod("Failed", state=terminated(exit_code, "plain log line\nlast line of the log"))
    status = derive_status(
        ftj(), failed_job("PodFailurePolicy", "Container trainer ..."), [failed], NOW
    )
    assert status["phase"] == "Failed"
    failure = condition(status, "Failed")
    assert (failure["status"], failure["reason"]) == ("True", reason)
    assert "last line of the log" in failure["message"]
    assert status["result"]["reason"] == reason
    assert status["completionTime"] == "2026-01-02T03:04:05Z"


def test_trainer_message_names_the_failure_when_it_wrote_one() -> None:
    message = json.dumps(
        {"outcome": "Failed", "reason": "DatasetError", "message": "pvc://data/x.jsonl: not found"}
    )
    failed = pod("Failed", state=terminated(3, message))
    status = derive_status(ftj(), failed_job("PodFailurePolicy"), [failed], NOW)
    assert condition(status, "Failed")["reason"] == "DatasetError"
    assert "pvc://data/x.jsonl: not found" in condition(status, "Failed")["message"]
    assert status["result"] == {
        "outcome": "Failed",
        "reason": "DatasetError",
        "message": "pvc://data/x.jsonl: not found",
        "metrics": {},
    }


@pytest.mark.parametrize("written", ["0", "not a reason", "Bad\nReason", "x" * 2000, ""])
def test_a_reason_the_pod_wrote_that_is_no_condition_reason_is_not_taken(written: str) -> None:
    """The termination message is whatever the pod wrote; a reason Kubernetes would refuse in a
    condition (found by the fuzz test: ``"0"``) leaves the operator's own, and the status
    still parses with its words."""
    message = json.dumps({"outcome": "Succeeded", "reason": written, "message": "odd"})
    failed = pod("Failed", state=terminated(1, message))
    status = derive_status(ftj(), failed_job("PodFailurePolicy"), [failed], NOW)
    assert status["phase"] == "Failed"
    for type_ in ("Ready", "Failed"):
        assert condition(status, type_)["reason"] == "TrainerError"
    assert "exited with code 1" in condition(status, "Failed")["message"]


def test_oom_killed_container_is_named() -> None:
    killed = pod("Failed", state=terminated(137, "", reason="OOMKilled"))
    status = derive_status(ftj(), failed_job("BackoffLimitExceeded"), [killed], NOW)
    assert condition(status, "Failed")["reason"] == "OOMKilled"


def test_deadline_exceeded_is_named_even_if_the_trainer_wrote_a_message() -> None:
    message = json.dumps({"outcome": "Failed", "reason": "Interrupted", "message": "SIGTERM"})
    killed = pod("Failed", state=terminated(143, message))
    status = derive_status(
        ftj(),
        failed_job("DeadlineExceeded", "Job was active longer than specified deadline"),
        [killed],
        NOW,
    )
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"


def test_backoff_limit_exceeded_after_unexpected_failures() -> None:
    first = pod("Failed", created="2026-01-02T02:00:00Z", state=terminated(1, "Traceback ..."))
    second = pod("Failed", created="2026-01-02T02:05:00Z", state=terminated(1, "Traceback ..."))
    status = derive_status(
        ftj(),
        job(
            ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
            failed=2,
        ),
        [first, second],
        NOW,
    )
    assert condition(status, "Failed")["reason"] == "TrainerError"
    assert status["attempts"] == 2


def test_backoff_limit_exceeded_without_exit_code_keeps_the_jobs_reason() -> None:
    status = derive_status(ftj(), failed_job("BackoffLimitExceeded", "limit"), [], NOW)
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"


def test_failed_attempt_that_will_be_retried_is_pending_retrying() -> None:
    failed = pod("Failed", state=terminated(1, "boom"))
    status = derive_status(ftj(), job(failed=1), [failed], NOW)
    assert status["phase"] == "Pending"
    assert condition(status, "Ready")["reason"] == "Retrying"
    assert status["attempts"] == 1


def test_suspended_job_is_suspended() -> None:
    status = derive_status(ftj(runPolicy={"suspend": True}), job(suspend=True), [], NOW)
    assert status["phase"] == "Suspended"
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Ready")["status"] == "False"


def test_job_waiting_for_kueue_is_queued() -> None:
    status = derive_status(ftj(scheduling={"queueName": "gpus"}), job(suspend=True), [], NOW)
    assert status["phase"] == "Queued"
    assert "gpus" in condition(status, "Suspended")["message"]


def test_deleted_running_pod_is_not_counted_as_running() -> None:
    leaving = pod("Running", state={"running": {"startedAt": EARLIER}})
    leaving["metadata"]["deletionTimestamp"] = EARLIER
    status = derive_status(ftj(), job(), [leaving], NOW)
    assert status["phase"] == "Pending"


def test_start_time_is_kept_across_attempts() -> None:
    running = pod("Running", state={"running": {"startedAt": "2026-01-02T03:00:00Z"}})
    status = derive_status(ftj({"startTime": EARLIER}), job(), [running], NOW)
    assert status["startTime"] == EARLIER


def test_last_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], "Ready", False, reason="Starting", message="", now=NOW)
    later = NOW + timedelta(minutes=5)
    same = set_condition(first, "Ready", False, reason="Unschedulable", message="x", now=later)
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert same[0]["reason"] == "Unschedulable"
    flipped = set_condition(same, "Ready", True, reason="Running", message="", now=later)
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"


def test_conditions_keep_their_transition_time_through_derive() -> None:
    running = pod("Running", state={"running": {"startedAt": EARLIER}})
    first = derive_status(ftj(), job(), [running], NOW)
    second = derive_status(ftj(first), job(), [running], NOW + timedelta(hours=1))
    assert second["conditions"] == first["conditions"]


def test_every_condition_type_is_always_present_once() -> None:
    status = derive_status(ftj(), job(), [], NOW)
    assert [c["type"] for c in status["conditions"]] == [
        "Ready",
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
    ]
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])


def test_log_tail_instead_of_json_is_a_message_not_a_result() -> None:
    result, text = parse_termination_message("line 1\n" * 20 + "CUDA error: out of memory")
    assert result is None
    assert text.endswith("CUDA error: out of memory")
    assert text.count("\n") <= 4


def test_a_message_nested_past_pythons_limit_is_text_not_a_crash() -> None:
    # A trainer pod's code (trustRemoteCode) may write any 4 KiB into the termination log.
    result, text = parse_termination_message("[" * 4000)
    assert result is None and text.startswith("[")


def test_ttl_counts_from_completion() -> None:
    status = {"phase": "Succeeded", "completionTime": "2026-01-02T03:00:00Z"}
    assert ttl_remaining(status, 600, NOW) == 600 - 245
    assert ttl_remaining(status, 60, NOW) == 60 - 245
    assert ttl_remaining(status, None, NOW) is None
    assert ttl_remaining({"phase": "Running"}, 60, NOW) is None


def test_transition_is_an_event_only_when_phase_or_reason_changes() -> None:
    pending = derive_status(ftj(), job(), [], NOW)
    running = derive_status(
        ftj(pending), job(), [pod("Running", state={"running": {"startedAt": EARLIER}})], NOW
    )
    assert transition(pending, pending) is None
    assert transition(pending, running) == (
        "Normal",
        "Running",
        "Pending → Running: the trainer is running",
    )
    failed = derive_status(ftj(running), failed_job("DeadlineExceeded", "too long"), [], NOW)
    change = transition(running, failed)
    assert change is not None and change[0] == "Warning" and change[1] == "DeadlineExceeded"


def test_failure_target_names_the_exit_code_before_the_pod_is_marked_failed() -> None:
    terminating = pod("Running", state=terminated(3, "no such file"))
    status = derive_status(
        ftj(), job(("FailureTarget", "PodFailurePolicy", "")), [terminating], NOW
    )
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DatasetError"


@pytest.mark.parametrize(
    "message",
    [
        'secret "hf-token" not found',
        "couldn't find key token in Secret team-a/hf-token",
        "secret 'hf-token' not found",
        "key 'token' not found in secret 'hf-token'",
    ],
)
def test_a_missing_secret_or_key_shows_as_missing_reference_naming_the_field_not_which(
    message: str,
) -> None:
    """Whether the Secret or only its key is missing is not the creator's to learn (they may not
    read Secrets): one fixed message for both, naming the field that references it."""
    stuck = pod(
        "Pending",
        state={"waiting": {"reason": "CreateContainerConfigError", "message": message}},
    )
    spec = {"model": {"uri": "org/m", "tokenSecretRef": {"name": "hf-token", "key": "token"}},
            "tracking": {"mlflow": {"tokenSecretRef": {"name": "other", "key": "t"}}}}  # fmt: skip
    status = derive_status(ftj(**spec), job(active=1), [stuck], NOW)
    assert status["phase"] == "Pending"
    assert condition(status, "Ready")["reason"] == "MissingReference"
    assert condition(status, "Ready")["message"] == (
        "spec.model.tokenSecretRef: the Secret or its key is not available to the trainer pod "
        "(the pod starts once it is)"
    )


def test_trainer_exited_zero_while_the_pod_still_reads_running_is_finishing_not_pending() -> None:
    # The kubelet reports the container's end before the pod's phase: no Running → Pending flap.
    ending = pod("Running", state=terminated(0, reason="Completed"))
    status = derive_status(ftj(), job(active=1), [ending], NOW)
    assert status["phase"] == "Running"
    assert condition(status, "Running")["reason"] == "Finishing"


def test_a_failed_job_without_a_message_still_says_why() -> None:
    status = derive_status(ftj(), failed_job("BackoffLimitExceeded"), [], NOW)
    assert status["phase"] == "Failed"
    assert "BackoffLimitExceeded" in condition(status, "Failed")["message"]


# --- a multi-pod group (resources.nodes > 1): one Indexed Job per group attempt ---------------


def group_job(*conditions: tuple[str, str, str], attempt: int = 1, **status: Any) -> dict[str, Any]:
    found = job(*conditions, **status)
    found["metadata"]["annotations"] = {"kubetune.io/attempt": str(attempt)}
    return found


def rank_pod(rank: int, phase: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
    found = pod(phase, created=f"2026-01-02T02:0{rank}:00Z", state=state)
    found["metadata"]["name"] = f"run-1-{rank}-abcde"
    found["metadata"]["labels"] = {"batch.kubernetes.io/job-completion-index": str(rank)}
    return found


GROUP = {"resources": {"gpus": 2, "nodes": 2}, "runPolicy": {"backoffLimit": 2}}


def test_a_group_that_finished_reports_rank_zeros_result_and_its_world_size() -> None:
    worker_result = {**RESULT, "message": "a worker's message"}
    pods = [
        rank_pod(1, "Succeeded", terminated(0, json.dumps(worker_result), "Completed")),
        rank_pod(0, "Succeeded", terminated(0, json.dumps(RESULT), "Completed")),
    ]
    status = derive_status(
        ftj(**GROUP), group_job(("Complete", "", ""), attempt=2, succeeded=2), pods, NOW
    )
    assert status["phase"] == "Succeeded"
    assert status["result"]["message"] == "trained 10 steps"
    assert (status["podName"], status["attempts"], status["worldSize"]) == ("run-1-0-abcde", 2, 4)


def test_one_lost_pod_fails_the_group_attempt_and_the_group_restarts_as_one_attempt() -> None:
    pods = [
        rank_pod(0, "Failed", terminated(143)),
        rank_pod(1, "Failed", terminated(137, reason="Error")),
    ]
    pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = (
        "2026-01-02T02:11:00Z"
    )
    lost = group_job(("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified "
                      "backoff limit"), attempt=1, failed=2)  # fmt: skip
    status = derive_status(ftj(**GROUP), lost, pods, NOW)
    assert status["phase"] == "Pending"
    ready = condition(status, "Ready")
    assert ready["reason"] == "Retrying"
    assert "group attempt 1 failed" in ready["message"] and "node rank 1" in ready["message"]
    assert condition(status, "Failed")["status"] == "False"
    assert status["attempts"] == 1
    # The last attempt the backoffLimit allows fails the job for good.
    last = group_job(("Failed", "BackoffLimitExceeded", "backoff"), attempt=3, failed=2)
    final = derive_status(ftj(**GROUP), last, pods, NOW)
    assert final["phase"] == "Failed"
    assert condition(final, "Failed")["reason"] == "BackoffLimitExceeded"
    assert final["attempts"] == 3


def test_a_non_retriable_exit_on_any_rank_fails_the_group_at_once_with_that_ranks_reason() -> None:
    dataset_error = {"outcome": "Failed", "reason": "DatasetError", "message": "line 5: bad JSON"}
    pods = [
        rank_pod(0, "Failed", terminated(143)),
        rank_pod(1, "Failed", terminated(3, json.dumps(dataset_error))),
    ]
    failed = group_job(("Failed", "PodFailurePolicy", "Container trainer for pod ns/run-1-1 "
                        "failed with exit code 3"), attempt=1, failed=2)  # fmt: skip
    status = derive_status(ftj(**GROUP), failed, pods, NOW)
    assert status["phase"] == "Failed"
    reason = condition(status, "Failed")
    assert reason["reason"] == "DatasetError"
    assert reason["message"].startswith("node rank 1: ") and "line 5: bad JSON" in reason["message"]
    assert status["result"]["reason"] == "DatasetError"
    assert status["podName"] == "run-1-0-abcde"


def test_a_group_runs_while_its_pods_run() -> None:
    pods = [rank_pod(0, "Running", {"running": {"startedAt": EARLIER}}), rank_pod(1, "Pending")]
    status = derive_status(ftj(**GROUP), group_job(), pods, NOW)
    assert status["phase"] == "Running"
    assert "1 of 2 pods" in condition(status, "Ready")["message"]


def test_a_group_is_retrying_from_the_moment_one_of_its_pods_goes() -> None:
    going = rank_pod(1, "Running", {"running": {"startedAt": EARLIER}})
    going["metadata"]["deletionTimestamp"] = EARLIER
    pods = [rank_pod(0, "Running", {"running": {"startedAt": EARLIER}}), going]
    status = derive_status(ftj(**GROUP), group_job(), pods, NOW)
    assert condition(status, "Ready")["reason"] == "Retrying"
    assert "node rank 1" in condition(status, "Ready")["message"]
    # A rank that exits with a code no retry fixes is not a restart in the making.
    bad = rank_pod(1, "Failed", terminated(3))
    running = rank_pod(0, "Running", {"running": {"startedAt": EARLIER}})
    status = derive_status(ftj(**GROUP), group_job(), [running, bad], NOW)
    assert condition(status, "Ready")["reason"] == "Running"


def test_an_event_per_phase_change_and_per_problem_not_per_step_on_the_way() -> None:
    running = derive_status(
        ftj(), job(), [pod("Running", state={"running": {"startedAt": EARLIER}})], NOW
    )
    finishing = derive_status(ftj(running), job(), [pod("Succeeded", state=terminated(0))], NOW)
    assert condition(finishing, "Ready")["reason"] == "Finishing"
    assert transition(running, finishing) is None  # a step within Running: no Event
    pending = derive_status(ftj(), job(), [], NOW)
    unschedulable = derive_status(
        ftj(pending),
        job(),
        [pod("Pending", started=False, conditions=[{"type": "PodScheduled", "status": "False",
              "reason": "Unschedulable", "message": "0/1 nodes are available"}])],
        NOW,
    )  # fmt: skip
    change = transition(pending, unschedulable)
    assert change is not None and change[:2] == ("Warning", "Unschedulable")
    assert transition(unschedulable, pending) is None  # back to Starting: no Event


def test_conditions_set_together_are_those_set_one_after_another() -> None:
    """A condition whose status stays keeps its lastTransitionTime, a flipped one moves to now;
    a type kubetune doesn't set is kept, after kubetune's, whichever way they are set."""
    current = [
        {"type": "Custom", "status": "True", "reason": "Theirs", "message": ""},
        {"type": "Running", "status": "True", "lastTransitionTime": EARLIER},
        {"type": "Ready", "status": "False", "lastTransitionTime": EARLIER},
    ]
    wanted = [("Running", True, "Running", "up"), ("Ready", True, "Running", "up"),
              ("Failed", False, "NoFailure", "")]  # fmt: skip
    together = set_conditions(current, wanted, NOW, generation=2)
    one_by_one: list[dict[str, Any]] = list(current)
    for type_, status, reason, message in wanted:
        one_by_one = set_condition(
            one_by_one, type_, status, reason=reason, message=message, now=NOW, generation=2
        )
    assert together == one_by_one
    assert [c["type"] for c in together] == ["Ready", "Running", "Failed", "Custom"]
    times = {c["type"]: c.get("lastTransitionTime") for c in together}
    assert times == {"Ready": "2026-01-02T03:04:05Z", "Running": EARLIER,
                     "Failed": "2026-01-02T03:04:05Z", "Custom": None}  # fmt: skip
