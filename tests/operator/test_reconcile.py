"""planner.plan: what one level-triggered reconcile does, from the FineTuneJob and what exists."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api.bounded import AFFINITY, POD_SPEC
from kubetune.api.schema_bounds import largest
from kubetune.api.timestamps import rfc3339
from kubetune.operator.companions import companion_differs
from kubetune.operator.controller import slim_finetunejob
from kubetune.operator.planner import plan, status_changes
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import derive_status

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SETTINGS = OperatorSettings(trainer_network_policy=True)
UID = "ftj-uid"

SPEC: dict[str, Any] = {
    "model": {"uri": "org/model"},
    "dataset": {"uri": "https://datasets.example/train.jsonl"},
    "output": {"uri": "s3://bucket/adapter"},
}


def ftj(
    status: dict[str, Any] | None = None, run_policy: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    body_spec = {**SPEC, **spec}
    if run_policy is not None:
        body_spec["runPolicy"] = run_policy
    return {
        "metadata": {
            "name": "run-1",
            "namespace": "ns",
            "uid": UID,
            "generation": 1,
            "creationTimestamp": rfc3339(NOW - timedelta(seconds=5)),
        },
        "spec": body_spec,
        "status": status or {},
    }


def owned(name: str, uid: str, spec: dict[str, Any], status: dict[str, Any], owner: str = UID,
          version: str = "7") -> dict[str, Any]:  # fmt: skip
    """A Job as the cache holds it, controller-owned by ``owner``."""
    metadata = {"name": name, "uid": uid, "resourceVersion": version,
                "ownerReferences": [{"uid": owner, "controller": True}]}  # fmt: skip
    return {"metadata": metadata, "spec": spec, "status": status}


def job(owner: str = UID, suspend: bool = False, **spec: Any) -> dict[str, Any]:
    return owned("run-1", "job-uid", {"suspend": suspend, **spec}, {}, owner)


def running_pod(owner: str = "job-uid") -> dict[str, Any]:
    return {
        "metadata": {
            "name": "run-1-abc",
            "creationTimestamp": "2026-01-02T03:00:00Z",
            "ownerReferences": [{"uid": owner, "controller": True}],
        },
        "status": {
            "phase": "Running",
            "startTime": "2026-01-02T03:00:01Z",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"running": {"startedAt": "2026-01-02T03:00:02Z"}},
                }
            ],
        },
    }


def test_a_new_job_without_children_is_validated_first() -> None:
    work = plan(ftj(), [], [], SETTINGS, NOW)
    assert work.validate is not None and work.validate.model.uri == "org/model"
    assert work.create is None and work.reject is None and work.status_patch is None


def test_a_new_job_with_validation_off_creates_the_trainer_job_at_once() -> None:
    work = plan(ftj(validation={"enabled": False}), [], [], SETTINGS, NOW)
    assert work.create is not None and work.validate is None


def validation_job(*conditions: str, suspend: bool = False) -> dict[str, Any]:
    status = {"conditions": [{"type": c, "status": "True"} for c in conditions]}
    if "Failed" in conditions:
        status["failed"] = 1
    return owned("run-1-validate", "validation-uid", {"suspend": suspend}, status, version="3")


def validation_pod(code: int | None, message: str = "") -> dict[str, Any]:
    if code is None:
        return running_pod(owner="validation-uid")
    state = {
        "terminated": {"exitCode": code, "message": message, "startedAt": "2026-01-02T03:00:02Z"}
    }
    return {
        "metadata": {
            "name": "run-1-validate-x",
            "creationTimestamp": "2026-01-02T03:00:00Z",
            "ownerReferences": [{"uid": "validation-uid", "controller": True}],
        },
        "status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "startTime": "2026-01-02T03:00:01Z",
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


ESTIMATE = {"examples": 512, "tokens": 6170, "sequences": 103, "steps": 7, "sampled": False}


def test_while_the_validation_job_runs_the_job_is_validating_and_no_trainer_job_is_made() -> None:
    work = plan(ftj(), [validation_job()], [validation_pod(None)], SETTINGS, NOW)
    assert work.create is None and work.validate is None
    assert work.status_patch is not None and work.status_patch["phase"] == "Validating"
    ready = next(c for c in work.status_patch["conditions"] if c["type"] == "Ready")
    running = next(c for c in work.status_patch["conditions"] if c["type"] == "Running")
    assert (ready["reason"], running["status"]) == ("Validating", "False")
    assert "run-1-validate" in ready["message"]
    assert "attempts" not in work.status_patch and "podName" not in work.status_patch


def test_a_failed_validation_fails_the_job_with_the_trainers_reason_and_no_trainer_job() -> None:
    message = (
        '{"outcome": "Failed", "reason": "DatasetError", '
        '"message": "data/train.jsonl line 5: not valid JSON"}'
    )
    failed = validation_job("FailureTarget", "Failed")
    work = plan(ftj(), [failed], [validation_pod(3, message)], SETTINGS, NOW)
    assert work.create is None and work.validate is None
    assert work.status_patch is not None and work.status_patch["phase"] == "Failed"
    condition = next(c for c in work.status_patch["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "DatasetError" and "line 5" in condition["message"]
    assert work.status_patch["result"]["reason"] == "DatasetError"


def test_a_passed_validation_creates_the_trainer_job_and_its_first_status_has_the_estimate() -> (
    None
):
    message = json.dumps(
        {"outcome": "Succeeded", "reason": "Validated", "message": "ok", "estimate": ESTIMATE}
    )
    passed = validation_job("SuccessCriteriaMet", "Complete")
    work = plan(ftj(), [passed], [validation_pod(0, message)], SETTINGS, NOW)
    assert work.create is not None
    assert work.status_patch is None  # no write of its own: it goes with the next one
    running = plan(ftj(), [passed, job()], [validation_pod(0, message), running_pod()],
                   SETTINGS, NOW)  # fmt: skip
    assert running.status_patch is not None
    assert running.status_patch["phase"] == "Running"
    assert running.status_patch["estimate"] == ESTIMATE
    again = plan(ftj(status={"estimate": ESTIMATE}), [passed, job()],
                 [validation_pod(0, message), running_pod()], SETTINGS, NOW)  # fmt: skip
    assert again.status_patch is not None and "estimate" not in again.status_patch


def test_a_new_jobs_validating_phase_is_held_a_moment_and_written_if_it_takes_long() -> None:
    def started(seconds: int) -> dict[str, Any]:
        made = validation_job()
        made["metadata"]["creationTimestamp"] = rfc3339(NOW - timedelta(seconds=seconds))
        return made

    held = plan(ftj(), [started(2)], [validation_pod(None)], SETTINGS, NOW)
    assert held.status_patch is None and held.requeue_after == pytest.approx(8.0)
    slow = plan(ftj(), [started(30)], [validation_pod(None)], SETTINGS, NOW)
    assert slow.status_patch is not None and slow.status_patch["phase"] == "Validating"


def test_once_the_trainer_job_exists_the_validation_job_is_not_read() -> None:
    passed = validation_job("SuccessCriteriaMet", "Complete")
    work = plan(ftj(), [passed, job()], [running_pod()], SETTINGS, NOW)
    assert work.create is None and work.validate is None
    assert work.status_patch is not None and work.status_patch["phase"] == "Running"
    assert work.status_patch["jobName"] == "run-1"


def test_a_suspended_run_suspends_its_validation_and_resumes_it() -> None:
    suspended = plan(
        ftj(run_policy={"suspend": True}), [validation_job(suspend=True)], [], SETTINGS, NOW
    )
    assert suspended.status_patch is not None and suspended.status_patch["phase"] == "Suspended"
    resumed = plan(ftj(), [validation_job(suspend=True)], [], SETTINGS, NOW)
    assert resumed.job_patch == {"spec": {"suspend": False}}
    assert resumed.patched_job == "run-1-validate"


def test_a_denied_option_fails_before_anything_is_created() -> None:
    work = plan(ftj(model={"uri": "org/model", "trustRemoteCode": True}), [], [], SETTINGS, NOW)
    assert work.create is None
    assert work.reject is not None and work.reject.reason == "Denied"
    assert "spec.model.trustRemoteCode" in work.reject.message


def test_a_spec_the_models_refuse_fails_invalid_spec_naming_the_field() -> None:
    work = plan(ftj(model={"uri": "ftp://mirror.invalid/m"}), [], [], SETTINGS, NOW)
    assert work.reject is not None and work.reject.reason == "InvalidSpec"
    assert work.reject.message.startswith("spec.model.uri")


def test_a_same_named_job_of_someone_else_is_a_name_conflict_and_never_touched() -> None:
    work = plan(ftj(), [job(owner="someone-else")], [], SETTINGS, NOW)
    assert work.reject is not None and work.reject.reason == "NameConflict"
    assert work.create is None and work.job_patch is None


def test_pods_of_a_foreign_job_are_not_read() -> None:
    work = plan(ftj(), [job()], [running_pod(owner="other-job")], SETTINGS, NOW)
    assert work.status_patch is not None and work.status_patch["phase"] == "Pending"


def test_status_is_derived_from_the_owned_job_and_its_pods() -> None:
    work = plan(ftj(), [job()], [running_pod()], SETTINGS, NOW)
    assert work.create is None
    assert work.status_patch is not None and work.status_patch["phase"] == "Running"


def test_nothing_changed_means_no_patch() -> None:
    body = ftj()
    body["status"] = derive_status(body, job(), [running_pod()], NOW)
    later = NOW + timedelta(minutes=5)
    assert plan(body, [job()], [running_pod()], SETTINGS, later).status_patch is None


def test_the_status_patch_never_carries_progress() -> None:
    body = ftj(status={"phase": "Running", "progress": {"step": 3}})
    derived = {**derive_status(body, job(), [running_pod()], NOW), "progress": {"step": 1}}
    changes = status_changes(body["status"], derived)
    assert changes is not None and "progress" not in changes


def test_suspend_in_the_spec_suspends_the_owned_job() -> None:
    work = plan(ftj(run_policy={"suspend": True}), [job()], [], SETTINGS, NOW)
    assert work.job_patch == {"spec": {"suspend": True}}


def queued_job(suspend: bool) -> dict[str, Any]:
    labelled = job(suspend=suspend)
    labelled["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus"}
    return labelled


def test_resume_unsuspends_the_job_unless_a_queue_admits_it() -> None:
    resumed = plan(ftj(run_policy={"suspend": False}), [job(suspend=True)], [], SETTINGS, NOW)
    assert resumed.job_patch == {"spec": {"suspend": False}}
    assert resumed.workload_active is None
    queued = ftj(run_policy={"suspend": False}, scheduling={"queueName": "gpus"})
    # A Job Kueue manages: Kueue unsuspends it once admitted.
    assert plan(queued, [queued_job(suspend=True)], [], SETTINGS, NOW).job_patch is None
    # Made suspended (so not labelled yet): resuming hands it to its queue, still suspended.
    handed = plan(queued, [job(suspend=True)], [], SETTINGS, NOW)
    assert handed.job_patch == {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "gpus"}}}


def test_suspending_a_queued_job_deactivates_its_workload_and_resuming_activates_it() -> None:
    scheduling = {"queueName": "gpus"}
    suspended = ftj(run_policy={"suspend": True}, scheduling=scheduling)
    # Admitted and running: Kueue owns the Job's suspend, the Workload is deactivated instead.
    work = plan(suspended, [queued_job(suspend=False)], [running_pod()], SETTINGS, NOW)
    assert work.job_patch is None
    assert work.workload_active is False
    resumed = ftj(
        run_policy={"suspend": False}, scheduling=scheduling, status={"phase": "Suspended"}
    )
    assert plan(resumed, [queued_job(suspend=True)], [], SETTINGS, NOW).workload_active is True
    # Waiting in the queue (not after a suspension): the Workload is left as Kueue has it.
    waiting = ftj(run_policy={"suspend": False}, scheduling=scheduling, status={"phase": "Queued"})
    assert plan(waiting, [queued_job(suspend=True)], [], SETTINGS, NOW).workload_active is None


def test_a_new_deadline_follows_to_the_job() -> None:
    body = ftj(run_policy={"activeDeadlineSeconds": 600})
    work = plan(body, [job(activeDeadlineSeconds=300)], [], SETTINGS, NOW)
    assert work.job_patch == {"spec": {"activeDeadlineSeconds": 600}}


def test_a_finished_job_is_never_started_again() -> None:
    body = ftj(status={"phase": "Failed", "completionTime": rfc3339(NOW)})
    work = plan(body, [], [], SETTINGS, NOW)
    assert work.create is None and work.reject is None and not work.delete


def test_a_finished_job_is_deleted_once_its_ttl_passes_and_looked_at_again_before() -> None:
    finished = {"phase": "Succeeded", "completionTime": rfc3339(NOW - timedelta(seconds=30))}
    body = ftj(status=finished, run_policy={"ttlSecondsAfterFinished": 60})
    waiting = plan(body, [], [], SETTINGS, NOW)
    assert not waiting.delete and waiting.requeue_after == pytest.approx(30)
    assert plan(body, [], [], SETTINGS, NOW + timedelta(seconds=31)).delete


def test_a_job_being_deleted_is_left_alone() -> None:
    body = ftj()
    body["metadata"]["deletionTimestamp"] = rfc3339(NOW)
    work = plan(body, [], [], SETTINGS, NOW)
    assert work.create is None and work.status_patch is None and work.reject is None


def test_a_failed_group_attempt_replaces_its_job_and_the_next_job_is_the_next_attempt() -> None:
    group = {
        "resources": {"nodes": 2},
        "runPolicy": {"backoffLimit": 1},
        "validation": {"enabled": False},
    }
    lost = job()
    lost["metadata"]["annotations"] = {"kubetune.io/attempt": "1"}
    lost["status"] = {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}  # fmt: skip
    work = plan(ftj(**group), [lost], [], SETTINGS, NOW)
    assert work.delete_job and work.job_patch is None
    assert work.status_patch is not None and work.status_patch["attempts"] == 1
    # While its pods go, the Job waits (foreground deletion); nothing else is done.
    going = {**lost, "metadata": {**lost["metadata"], "deletionTimestamp": rfc3339(NOW)}}
    assert not plan(ftj({"attempts": 1}, **group), [going], [], SETTINGS, NOW).delete_job
    # Once it is gone, the next attempt's Job is made.
    again = plan(ftj({"attempts": 1, "phase": "Pending"}, **group), [], [], SETTINGS, NOW)
    assert again.create is not None and again.attempt == 2
    # No attempts left: the Job stays, and the FineTuneJob fails.
    last = {**lost, "metadata": {**lost["metadata"], "annotations": {"kubetune.io/attempt": "2"}}}
    final = plan(ftj({"attempts": 2}, **group), [last], [], SETTINGS, NOW)
    assert not final.delete_job
    assert final.status_patch is not None and final.status_patch["phase"] == "Failed"


def pod_at(
    seconds_ago: float, state: dict[str, Any] | None, phase: str = "Running"
) -> dict[str, Any]:
    """A pod of the owned Job, started ``seconds_ago``, its trainer in ``state``."""
    started = rfc3339(NOW - timedelta(seconds=seconds_ago))
    statuses = [{"name": "trainer", "state": state}] if state is not None else []
    return {
        "metadata": {
            "name": "run-1-abc",
            "creationTimestamp": started,
            "ownerReferences": [{"uid": "job-uid", "controller": True}],
        },
        "status": {"phase": phase, "startTime": started, "containerStatuses": statuses},
    }


def reason_of(status: dict[str, Any]) -> str:
    return next(c["reason"] for c in status["conditions"] if c["type"] == "Ready")


def test_running_to_succeeded_is_one_write_when_the_job_completes_soon_after_the_trainer() -> None:
    running = derive_status(ftj(), job(), [running_pod()], NOW)
    exited = {"terminated": {"exitCode": 0, "finishedAt": rfc3339(NOW - timedelta(seconds=2))}}
    # The trainer exited 0 two seconds ago; the Job isn't Complete yet: nothing written, a look
    # again when the hold ends (the Job's event comes sooner).
    held = plan(ftj(running), [job()], [pod_at(30, exited, "Succeeded")], SETTINGS, NOW)
    assert held.status_patch is None
    assert held.requeue_after == pytest.approx(8.0)
    # The Job controller is slow: after the hold the status says Finishing.
    late = NOW + timedelta(seconds=11)
    slow = plan(ftj(running), [job()], [pod_at(30, exited, "Succeeded")], SETTINGS, late)
    assert slow.status_patch is not None and reason_of(slow.status_patch) == "Finishing"
    assert "phase" not in slow.status_patch  # still Running
    # Complete: one write from Running straight to Succeeded.
    complete = job()
    complete["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    done = plan(ftj(running), [complete], [pod_at(30, exited, "Succeeded")], SETTINGS, NOW)
    assert done.status_patch is not None and done.status_patch["phase"] == "Succeeded"


def test_a_starting_pod_is_written_with_running_unless_it_takes_long() -> None:
    pending = derive_status(ftj(), job(), [], NOW)
    assert pending["phase"] == "Pending" and "podName" not in pending
    creating = {"waiting": {"reason": "ContainerCreating"}}
    # The pod has a start time but its trainer doesn't run yet: the pod's name alone waits.
    held = plan(ftj(pending), [job()], [pod_at(3, creating, "Pending")], SETTINGS, NOW)
    assert held.status_patch is None and held.requeue_after == pytest.approx(7.0)
    # Still not running after the hold: the pod's name is written (a person looks for it).
    slow = plan(ftj(pending), [job()], [pod_at(12, creating, "Pending")], SETTINGS, NOW)
    assert slow.status_patch is not None and slow.status_patch["podName"] == "run-1-abc"
    # Running: phase, pod name and attempts in one write.
    started = {"running": {"startedAt": rfc3339(NOW)}}
    run = plan(ftj(pending), [job()], [pod_at(3, started)], SETTINGS, NOW)
    assert run.status_patch is not None
    assert (run.status_patch["phase"], run.status_patch["podName"]) == ("Running", "run-1-abc")
    assert run.status_patch["attempts"] == 1


def test_a_problem_while_starting_is_written_at_once() -> None:
    pending = derive_status(ftj(), job(), [], NOW)
    pulling = {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}
    stuck = plan(ftj(pending), [job()], [pod_at(1, pulling, "Pending")], SETTINGS, NOW)
    assert stuck.status_patch is not None
    assert reason_of(stuck.status_patch) == "ImagePullBackOff"


def test_a_new_job_goes_from_new_to_running_in_one_write_when_its_pod_runs_soon() -> None:
    made = job()
    made["metadata"]["creationTimestamp"] = rfc3339(NOW - timedelta(seconds=2))
    # The Job was made two seconds ago, no pod yet: Pending isn't written yet.
    held = plan(ftj(), [made], [], SETTINGS, NOW)
    assert held.status_patch is None and held.requeue_after == pytest.approx(8.0)
    # The pod runs: the first write says Running.
    started = {"running": {"startedAt": rfc3339(NOW)}}
    run = plan(ftj(), [made], [pod_at(1, started)], SETTINGS, NOW)
    assert run.status_patch is not None and run.status_patch["phase"] == "Running"
    # No pod after the hold: Pending is written, naming the Job.
    late = plan(ftj(), [made], [], SETTINGS, NOW + timedelta(seconds=9))
    assert late.status_patch is not None
    assert (late.status_patch["phase"], late.status_patch["jobName"]) == ("Pending", "run-1")
    # Suspended is what the job will stay: written at once.
    suspended = plan(ftj(run_policy={"suspend": True}), [job(suspend=True)], [], SETTINGS, NOW)
    assert suspended.status_patch is not None
    assert suspended.status_patch["phase"] == "Suspended"


def test_a_queued_jobs_suspended_validation_job_resumes_with_the_run() -> None:
    # The validation Job is never queued: resuming the run unsuspends it, queue or not.
    resumed = ftj(run_policy={"suspend": False}, scheduling={"queueName": "gpus"})
    work = plan(resumed, [validation_job(suspend=True)], [], SETTINGS, NOW)
    assert work.job_patch == {"spec": {"suspend": False}}
    assert work.workload_active is None


# --- a group run by its JobSet (KUBETUNE_GROUP_WORKLOAD=jobset) ----------------------------------

JOBSET_GROUP = {"resources": {"nodes": 2}, "runPolicy": {"backoffLimit": 1},
                "validation": {"enabled": False}}  # fmt: skip


def jobset_obj(restarts: int = 0, *conditions: tuple[str, str], suspend: bool = False) -> Any:
    return {
        "kind": "JobSet",
        "metadata": {
            "name": "run-1",
            "uid": "jobset-uid",
            "resourceVersion": "9",
            "creationTimestamp": rfc3339(NOW - timedelta(minutes=5)),
            "ownerReferences": [{"uid": UID, "controller": True}],
        },
        "spec": {"suspend": suspend},
        "status": {
            "restarts": restarts,
            "conditions": [{"type": t, "status": "True", "reason": r} for t, r in conditions],
        },
    }


def child_job(restart: int, *failed: str, deleting: bool = False) -> dict[str, Any]:
    """The JobSet's Job of restart ``restart`` (``failed``: its Failed condition's reason)."""
    found = job(owner="jobset-uid")
    found["metadata"].update(name="run-1-node-0", uid=f"job-uid-{restart}")
    found["metadata"]["labels"] = {"jobset.sigs.k8s.io/restart-attempt": str(restart)}
    if deleting:
        found["metadata"]["deletionTimestamp"] = rfc3339(NOW)
    found["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": r} for r in failed]
    }
    return found


def rank(index: int, restart: int, state: dict[str, Any]) -> dict[str, Any]:
    found = running_pod(owner=f"job-uid-{restart}")
    found["metadata"]["name"] = f"run-1-node-0-{index}-abcde"
    found["metadata"]["labels"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    found["status"]["containerStatuses"][0]["state"] = state
    if "terminated" in state:
        found["status"]["phase"] = "Failed" if state["terminated"]["exitCode"] else "Succeeded"
    return found


RUNNING = {"running": {"startedAt": "2026-01-02T03:00:02Z"}}


def test_a_jobset_groups_status_is_its_current_jobs_and_nothing_else_is_made() -> None:
    pods = [rank(0, 1, RUNNING), rank(1, 1, RUNNING), rank(0, 0, RUNNING)]
    work = plan(ftj(**JOBSET_GROUP), [child_job(1)], pods, SETTINGS, NOW,
                jobsets=[jobset_obj(1)])  # fmt: skip
    assert work.create is None and not work.delete_job
    assert work.status_patch is not None
    assert work.status_patch["phase"] == "Running"
    # attempts: the JobSet's restarts + 1; the pods and the Job are the current restart's.
    assert work.status_patch["attempts"] == 2
    assert (work.status_patch["jobName"], work.status_patch["podName"]) == (
        "run-1-node-0", "run-1-node-0-0-abcde")  # fmt: skip
    assert "2 of 2 pods" in reason_message(work.status_patch)


def reason_message(status: dict[str, Any]) -> str:
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    return f"{ready['reason']}: {ready['message']}"


def test_a_jobset_restarting_after_a_lost_pod_is_retrying_and_the_operator_deletes_nothing() -> (
    None
):
    lost = [rank(0, 0, {"terminated": {"exitCode": 143, "finishedAt": "2026-01-02T03:01:00Z"}}),
            rank(1, 0, {"terminated": {"exitCode": 137, "finishedAt": "2026-01-02T03:00:59Z"}})]  # fmt: skip
    failed = child_job(0, "BackoffLimitExceeded")
    # The Job failed; JobSet has not counted the restart yet, or is deleting the old Job.
    for jobset, old in ((jobset_obj(0), failed), (jobset_obj(1), child_job(0, "BackoffLimitExceeded", deleting=True))):  # fmt: skip
        work = plan(ftj(**JOBSET_GROUP), [old], lost, SETTINGS, NOW, jobsets=[jobset])
        assert not work.delete_job and work.create is None
        assert work.status_patch is not None and work.status_patch["phase"] == "Pending"
        message = reason_message(work.status_patch)
        assert message.startswith("Retrying: group attempt 1 failed") and "node rank 1" in message
    # Between the old Job gone and the next made: nothing to write yet, a look again soon.
    gap = plan(ftj({"phase": "Pending"}, **JOBSET_GROUP), [], [], SETTINGS, NOW,
               jobsets=[jobset_obj(1)])  # fmt: skip
    assert gap.status_patch is None and gap.requeue_after is not None


def test_a_jobset_out_of_restarts_or_failed_by_a_non_retriable_exit_fails_the_job() -> None:
    last = [rank(0, 1, {"terminated": {"exitCode": 143}})]
    out = plan(ftj({"attempts": 2}, **JOBSET_GROUP), [child_job(1, "BackoffLimitExceeded")], last,
               SETTINGS, NOW, jobsets=[jobset_obj(1, ("Failed", "ReachedMaxRestarts"))])  # fmt: skip
    assert out.status_patch is not None and out.status_patch["phase"] == "Failed"
    error = {"outcome": "Failed", "reason": "DatasetError", "message": "line 5: bad JSON"}
    bad = [rank(0, 0, {"terminated": {"exitCode": 143, "finishedAt": "2026-01-02T03:01:00Z"}}),
           rank(1, 0, {"terminated": {"exitCode": 3, "message": json.dumps(error),
                                      "finishedAt": "2026-01-02T03:00:59Z"}})]  # fmt: skip
    fatal = plan(ftj(**JOBSET_GROUP), [child_job(0, "PodFailurePolicy")], bad, SETTINGS, NOW,
                 jobsets=[jobset_obj(0, ("Failed", "FailJobSetFailurePolicyAction"))])  # fmt: skip
    assert fatal.status_patch is not None
    assert fatal.status_patch["phase"] == "Failed" and fatal.status_patch["attempts"] == 1
    assert reason_message(fatal.status_patch).startswith("DatasetError: node rank 1: ")


def test_a_completed_jobset_succeeds_with_rank_zeros_result() -> None:
    result = {"outcome": "Succeeded", "reason": "Succeeded", "message": "trained 10 steps"}
    done = {"terminated": {"exitCode": 0, "message": json.dumps(result)}}
    child = child_job(0)
    child["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    work = plan(ftj(**JOBSET_GROUP), [child], [rank(1, 0, done), rank(0, 0, done)], SETTINGS,
                NOW, jobsets=[jobset_obj(0, ("Completed", "AllJobsCompleted"))])  # fmt: skip
    assert work.status_patch is not None and work.status_patch["phase"] == "Succeeded"
    assert work.status_patch["result"]["message"] == "trained 10 steps"
    assert work.status_patch["podName"] == "run-1-node-0-0-abcde"


def test_suspend_and_resume_go_to_the_jobset_and_never_to_its_job() -> None:
    suspended = plan(ftj(run_policy={"suspend": True, "activeDeadlineSeconds": 60},
                         **{k: v for k, v in JOBSET_GROUP.items() if k != "runPolicy"}),
                     [child_job(0)], [], SETTINGS, NOW, jobsets=[jobset_obj(0)])  # fmt: skip
    assert (suspended.job_patch, suspended.patched_job, suspended.patched_kind) == (
        {"spec": {"suspend": True}}, "run-1", "JobSet")  # fmt: skip
    resumed = plan(ftj(**JOBSET_GROUP), [child_job(0)], [], SETTINGS, NOW,
                   jobsets=[jobset_obj(0, suspend=True)])  # fmt: skip
    assert resumed.job_patch == {"spec": {"suspend": False}}
    labelled = jobset_obj(0, suspend=True)
    labelled["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    queued = plan(ftj(scheduling={"queueName": "q"}, **JOBSET_GROUP), [child_job(0)], [],
                  SETTINGS, NOW, jobsets=[labelled])  # fmt: skip
    assert queued.job_patch is None  # Kueue unsuspends it once admitted
    assert queued.status_patch is not None and queued.status_patch["phase"] == "Queued"
    # Suspended while queued: Kueue's Workload of the JobSet is deactivated, the JobSet untouched.
    held = plan(ftj(scheduling={"queueName": "q"}, runPolicy={"suspend": True},
                    **{k: v for k, v in JOBSET_GROUP.items() if k != "runPolicy"}),
                [child_job(0)], [], SETTINGS, NOW, jobsets=[labelled])  # fmt: skip
    assert (held.job_patch, held.workload_active, held.patched_kind) == (None, False, "JobSet")


def test_a_completed_jobset_succeeds_even_when_its_job_is_gone() -> None:
    work = plan(ftj({"phase": "Running"}, **JOBSET_GROUP), [], [], SETTINGS, NOW,
                jobsets=[jobset_obj(0, ("Completed", "AllJobsCompleted"))])  # fmt: skip
    assert work.status_patch is not None and work.status_patch["phase"] == "Succeeded"


# --- the watch cache keeps a few fields of the spec; the rest is read when children are made ----


def test_the_cached_finetunejob_keeps_none_of_a_large_spec() -> None:
    """A tenant's spec at every bound (affinity, pod template) costs the operator's cache a few
    hundred bytes: only what a reconcile reads between creates is kept."""
    history = [{"step": i, "loss": 1.0, "learningRate": 1e-4} for i in range(200)]
    large = ftj(
        status={"phase": "Running", "progress": {"step": 200, "history": history}},
        scheduling={"affinity": largest(AFFINITY), "queueName": "team-a"},
        podTemplate={"spec": largest(POD_SPEC)},
        resources={"gpus": 2, "nodes": 2, "cpu": "4"},
        run_policy={"suspend": True, "backoffLimit": 1},
        model={"uri": "org/model", "tokenSecretRef": {"name": "hf", "key": "token"}},
    )
    cached = slim_finetunejob(large)

    assert len(json.dumps(large)) > 400_000
    assert len(json.dumps(cached)) < 1_000
    assert cached["status"] == {"phase": "Running"}  # progress is the trainer's, never reconciled
    assert cached["spec"] == {
        "resources": {"gpus": 2, "nodes": 2},
        "runPolicy": {"suspend": True, "backoffLimit": 1},
        "scheduling": {"queueName": "team-a"},
        # Named in a MissingReference message when the pod can't read it.
        "model": {"tokenSecretRef": {"name": "hf", "key": "token"}},
    }


def test_a_cached_new_job_keeps_its_whole_spec_until_its_children_are_made() -> None:
    new = slim_finetunejob(ftj())
    assert not plan(new, [], [], SETTINGS, NOW).fetch_spec
    assert plan(new, [], [], SETTINGS, NOW).validate is not None
    passed = validation_job("SuccessCriteriaMet", "Complete")
    assert plan(new, [passed], [], SETTINGS, NOW).create is not None


def test_a_cached_new_job_with_a_large_spec_keeps_none_of_it_and_asks_for_it() -> None:
    large = ftj(podTemplate={"spec": largest(POD_SPEC)})
    cached = slim_finetunejob(large)
    assert len(json.dumps(cached)) < 1_000
    assert plan(cached, [], [], SETTINGS, NOW).fetch_spec


def test_a_cached_job_that_needs_its_children_again_asks_for_its_whole_spec() -> None:
    waiting = slim_finetunejob(ftj(status={"phase": "Pending"}))  # a missing reference
    assert plan(waiting, [], [], SETTINGS, NOW).fetch_spec


def test_a_cached_job_in_validation_or_running_needs_no_more_of_its_spec() -> None:
    cached = slim_finetunejob(ftj())

    validating = plan(cached, [validation_job()], [validation_pod(None)], SETTINGS, NOW)
    assert not validating.fetch_spec
    assert validating.status_patch is not None and validating.status_patch["phase"] == "Validating"
    running = plan(cached, [job()], [running_pod()], SETTINGS, NOW)
    assert not running.fetch_spec
    assert running.status_patch is not None and running.status_patch["phase"] == "Running"


def test_a_companion_with_other_content_than_rendered_differs_and_defaults_do_not() -> None:
    config = {"kind": "ConfigMap", "data": {"config.yaml": "a: 1\n"}}
    assert not companion_differs(config, {**config, "metadata": {"resourceVersion": "7"}})
    assert companion_differs(config, {"kind": "ConfigMap", "data": {"config.yaml": "b: 2\n"}})
    assert companion_differs(
        config, {"kind": "ConfigMap", "data": {"config.yaml": "a: 1\n", "extra": "x"}}
    )
    policy = {"kind": "NetworkPolicy", "spec": {"podSelector": {"matchLabels": {"a": "b"}},
              "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}}  # fmt: skip
    defaulted = {"spec": {**policy["spec"], "policyTypes": ["Egress"]}}
    assert not companion_differs(policy, defaulted)
    opened = {"spec": {**policy["spec"], "egress": [*policy["spec"]["egress"], {}]}}
    assert companion_differs(policy, opened)
    account = {"kind": "ServiceAccount"}
    assert companion_differs(account, {"imagePullSecrets": [{"name": "other-teams-registry"}]})


def test_a_status_write_keeps_the_cached_spec_and_a_spec_change_takes_the_new_one() -> None:
    """The event of a status write (same uid, same generation) reuses the spec the cache holds;
    a new generation, or another object of the same name, is read from the event."""
    first = ftj()
    cached = slim_finetunejob(first)
    written = {**first, "status": {"phase": "Validating"}}
    again = slim_finetunejob(written, cached)
    assert again["spec"] is cached["spec"] and again["status"] == {"phase": "Validating"}

    changed = {**written, "metadata": {**written["metadata"], "generation": 2}}
    changed["spec"] = {**first["spec"], "runPolicy": {"suspend": True}}
    assert slim_finetunejob(changed, cached)["spec"]["runPolicy"] == {"suspend": True}
    other = {**changed, "metadata": {**first["metadata"], "uid": "another"}}
    other["spec"] = changed["spec"]
    assert slim_finetunejob(other, cached)["spec"]["runPolicy"] == {"suspend": True}
