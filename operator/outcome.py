"""A Job and its Pods → the Outcome of the run: the phase and reason ``status.derive_status``
writes, the group's attempts and restarts, the Validating phase's Job read as a phase. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubetune.api.contract import (
    ATTEMPT_ANNOTATION,
    NON_RETRIABLE_EXIT_CODES,
    Reason,
)
from kubetune.operator.objects import Obj
from kubetune.operator.pods import (
    exit_code_of,
    failing_pod,
    failure_reason,
    job_condition,
    node_rank,
    parse_termination_message,
    pending_problem,
    pod_time,
    rank_zero_pod,
    terminated_state,
    trainer_container_status,
)


@dataclass(frozen=True)
class Outcome:
    """What the Job and Pods say, before it is spelled as conditions."""

    phase: str
    reason: str
    message: str
    running: bool = False


def nodes_of(ftj: Obj) -> int:
    """Pods in the FineTuneJob's group (``spec.resources.nodes``)."""
    return int((ftj.get("spec", {}).get("resources") or {}).get("nodes") or 1)


def world_size_of(ftj: Obj) -> int:
    """Training ranks: GPUs per pod (one rank on the CPU) times pods."""
    gpus = int((ftj.get("spec", {}).get("resources") or {}).get("gpus") or 0)
    return max(gpus, 1) * nodes_of(ftj)


def group_attempt(job: Obj) -> int:
    """Which group attempt a multi-pod group's Job runs (its annotation; 1 when unset)."""
    value = (job.get("metadata", {}).get("annotations") or {}).get(ATTEMPT_ANNOTATION)
    return int(value) if value and str(value).isdigit() else 1


def group_restart_due(ftj: Obj, job: Obj | None, pods: Sequence[Obj]) -> bool:
    """Whether a multi-pod group's Job failed in a way the next attempt may fix, with attempts
    left: then the operator replaces the Job (the whole group restarts from its checkpoint)."""
    if job is None or nodes_of(ftj) <= 1:
        return False
    failed = job_condition(job, "Failed", "FailureTarget")
    if failed is None or job_condition(job, "Complete", "SuccessCriteriaMet") is not None:
        return False
    if str(failed.get("reason")) in ("PodFailurePolicy", Reason.DEADLINE_EXCEEDED):
        return False  # a non-retriable exit on a rank, or the run's deadline: final
    if exit_code_of(failing_pod(pods, group=True)) in NON_RETRIABLE_EXIT_CODES:
        return False
    return _attempts_left(ftj, job)


def _attempts_left(ftj: Obj, job: Obj) -> bool:
    """Whether another group attempt follows this Job's: ``runPolicy.backoffLimit`` more after
    the first."""
    limit = int((ftj.get("spec", {}).get("runPolicy") or {}).get("backoffLimit", 3))
    return group_attempt(job) <= limit


def _group_member_lost(ftj: Obj, job: Obj, pods: Sequence[Obj]) -> bool:
    """A rank of a running group stopped for a reason a retry may fix (or its pod is being
    deleted), before the Job has said it failed: the attempt is ending, the next one follows."""
    if job_condition(job, "Failed", "FailureTarget", "Complete", "SuccessCriteriaMet"):
        return False
    if job.get("spec", {}).get("suspend") or not _attempts_left(ftj, job):
        return False  # suspending stops the pods too; or no attempt follows
    if any(exit_code_of(pod) in NON_RETRIABLE_EXIT_CODES for pod in pods):
        return False
    return any(
        pod.get("metadata", {}).get("deletionTimestamp") or (exit_code_of(pod) or 0) != 0
        for pod in pods
    )


def _group_retrying(ftj: Obj, job: Obj, pods: Sequence[Obj]) -> Outcome:
    pod = failing_pod(pods, group=True) or next(
        (p for p in pods if p.get("metadata", {}).get("deletionTimestamp")), None
    )
    terminated = terminated_state(pod) if pod is not None else None
    code = terminated.get("exitCode") if terminated else None
    why = failure_reason(code, terminated) or "a pod was lost"
    rank = node_rank(pod) if pod is not None else None
    where = f" on node rank {rank}" if rank is not None else ""
    return Outcome(
        "Pending",
        Reason.RETRYING,
        f"group attempt {group_attempt(job)} failed ({why}{where}): restarting all "
        f"{nodes_of(ftj)} pods from the newest checkpoint",
    )


def outcome_of(ftj: Obj, job: Obj | None, pods: Sequence[Obj]) -> tuple[Outcome, Obj | None]:
    """The outcome, and the pod whose termination message tells the result (if any)."""
    if job is None:
        return Outcome("Pending", Reason.CREATING, "creating the trainer Job"), None
    group = nodes_of(ftj) > 1
    done = job_condition(job, "Complete", "SuccessCriteriaMet")
    if done is not None:
        by_age = sorted(pods, key=pod_time)
        winner = (
            rank_zero_pod(pods)
            if group
            else next(
                (p for p in reversed(by_age) if p.get("status", {}).get("phase") == "Succeeded"),
                None,
            )
        )
        return Outcome("Succeeded", Reason.SUCCEEDED, "the trainer finished"), winner
    if group and (
        job.get("metadata", {}).get("deletionTimestamp")
        or group_restart_due(ftj, job, pods)
        or _group_member_lost(ftj, job, pods)
    ):
        return _group_retrying(ftj, job, pods), None
    failed = job_condition(job, "Failed", "FailureTarget")
    if failed is not None:
        return _failed(failed, pods, group)
    return _unfinished(ftj, job, pods, group), None


def _failed(failed: Obj, pods: Sequence[Obj], group: bool) -> tuple[Outcome, Obj | None]:
    """A Job that failed (``failed``: its condition), and the pod that failed it: its trainer
    has terminated, though the pod may not be Failed yet when the Job's FailureTarget condition
    comes first."""
    last = failing_pod(pods, group)
    job_reason = str(failed.get("reason") or "Failed")
    # A Job condition without a message still fails with words a person can read.
    job_message = str(failed.get("message") or f"the trainer Job failed ({job_reason})")
    terminated = terminated_state(last) if last is not None else None
    exit_code = terminated.get("exitCode") if terminated else None
    reason = job_reason
    if job_reason not in (Reason.DEADLINE_EXCEEDED,):
        reason = failure_reason(exit_code, terminated) or job_reason
    if reason == "PodFailurePolicy":
        reason = Reason.TRAINER_ERROR
    message = job_message
    if exit_code is not None and reason != job_reason:
        message = f"the trainer exited with code {exit_code}"
    return Outcome("Failed", reason, message), last


def _trainer_state(pod: Obj) -> Obj:
    return dict((trainer_container_status(pod) or {}).get("state") or {})


def _unfinished(ftj: Obj, job: Obj, pods: Sequence[Obj], group: bool) -> Outcome:
    """A Job neither Complete nor Failed: suspended or queued, running, waiting on a problem,
    retrying, finishing, or starting."""
    if job.get("spec", {}).get("suspend"):
        queue = ftj.get("spec", {}).get("scheduling", {}).get("queueName")
        user_suspended = ftj.get("spec", {}).get("runPolicy", {}).get("suspend", False)
        if queue and not user_suspended:
            return Outcome("Queued", Reason.QUEUED, f"waiting for admission by queue {queue}")
        return Outcome("Suspended", Reason.SUSPENDED, "suspended by spec.runPolicy.suspend")
    running = [
        p
        for p in pods
        if p.get("status", {}).get("phase") == "Running"
        and not p.get("metadata", {}).get("deletionTimestamp")
        and _trainer_state(p).get("running") is not None
    ]
    if running:
        text = "the trainer is running"
        if group:
            text = f"the trainer is running ({len(running)} of {nodes_of(ftj)} pods)"
        return Outcome("Running", Reason.RUNNING, text, running=True)
    problem = pending_problem(
        [p for p in pods if p.get("status", {}).get("phase") == "Pending"], ftj.get("spec") or {}
    )
    if problem is not None:
        return Outcome("Pending", problem[0], problem[1])
    by_age = sorted(pods, key=pod_time)
    failed_pods = [p for p in by_age if p.get("status", {}).get("phase") == "Failed"]
    if failed_pods:
        terminated = terminated_state(failed_pods[-1])
        code = terminated.get("exitCode") if terminated else None
        reason = failure_reason(code, terminated) or Reason.TRAINER_ERROR
        return Outcome("Pending", Reason.RETRYING, f"attempt {len(failed_pods)} failed ({reason})")
    if any(
        p.get("status", {}).get("phase") == "Succeeded"
        or (_trainer_state(p).get("terminated") or {}).get("exitCode") == 0
        for p in pods
    ):
        # The trainer is done but the Job controller hasn't marked the Job Complete yet: still
        # Running, not back to Pending (that flap would post two misleading events).
        return Outcome("Running", Reason.FINISHING, "the trainer finished; completing the Job")
    return Outcome("Pending", Reason.STARTING, "waiting for the trainer pod to start")


#: What the validation Job's pods may say that the Validating phase reports as it is.
_VALIDATION_KEEPS: Final = ("Failed", "Suspended")


def as_validating(outcome: Outcome, job: Obj) -> Outcome:
    """The validation Job's outcome as the FineTuneJob's: Validating until it fails (or is
    suspended); a problem with its pod (unschedulable, image, secret) is Pending with its
    reason, as for the trainer's pod."""
    if outcome.phase in _VALIDATION_KEEPS:
        return outcome
    if outcome.phase == "Pending" and outcome.reason in PROBLEM_REASONS - {Reason.RETRYING}:
        return outcome  # Pending, as for the trainer's pod: a person has something to fix
    name = job.get("metadata", {}).get("name")
    message = f"checking the data and estimating the run (Job {name}, no GPU)"
    return Outcome("Validating", Reason.VALIDATING, message)


def validation_estimate(job: Obj, pods: Sequence[Obj]) -> dict[str, Any] | None:
    """``status.estimate`` from the finished validation Job's termination message (None when
    the Job hasn't succeeded, or its trainer wrote no estimate)."""
    outcome, pod = outcome_of({}, job, pods)
    if outcome.phase != "Succeeded" or pod is None:
        return None
    terminated = terminated_state(pod)
    result, _ = parse_termination_message(
        str(terminated.get("message") or "") if terminated else None
    )
    estimate = (result or {}).get("estimate")
    return dict(estimate) if isinstance(estimate, dict) else None


def validation_succeeded(job: Obj) -> bool:
    return job_condition(job, "Complete", "SuccessCriteriaMet") is not None


PROBLEM_REASONS: Final = {
    Reason.UNSCHEDULABLE,
    Reason.IMAGE_PULL_BACK_OFF,
    Reason.CREATE_CONTAINER_CONFIG_ERROR,
    Reason.CREATE_CONTAINER_ERROR,
    Reason.RETRYING,
    Reason.MISSING_REFERENCE,
}
