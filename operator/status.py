"""The batch/v1 Job and its Pods → the FineTuneJob's status. Pure: data in, a status patch out."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from kubetune.api.contract import (
    ATTEMPT_ANNOTATION,
    COMPLETION_INDEX_LABEL,
    CONDITION_TYPES,
    EXIT_CODE_REASONS,
    NON_RETRIABLE_EXIT_CODES,
    TRAINER_CONTAINER,
    ConditionType,
    ExitCode,
    Reason,
)
from kubetune.api.models import TrainerResult
from kubetune.api.timestamps import parse_rfc3339, rfc3339

Obj = Mapping[str, Any]

READY: Final = ConditionType.READY
RUNNING: Final = ConditionType.RUNNING
SUCCEEDED: Final = ConditionType.SUCCEEDED
FAILED: Final = ConditionType.FAILED
SUSPENDED: Final = ConditionType.SUSPENDED

#: Waiting reasons of the trainer container that a person has to fix (image, config, secret).
_WAITING_PROBLEMS: Final = {
    "ImagePullBackOff": Reason.IMAGE_PULL_BACK_OFF,
    "ErrImagePull": Reason.IMAGE_PULL_BACK_OFF,
    "InvalidImageName": Reason.IMAGE_PULL_BACK_OFF,
    "CreateContainerConfigError": Reason.CREATE_CONTAINER_CONFIG_ERROR,
    "CreateContainerError": Reason.CREATE_CONTAINER_ERROR,
}
_MESSAGE_LIMIT: Final = 1024


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    *,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; its lastTransitionTime moves only when status flips."""
    value = "True" if status else "False"
    result = [dict(c) for c in conditions if c.get("type") != type_]
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = (
        previous["lastTransitionTime"]
        if previous is not None
        and previous.get("status") == value
        and previous.get("lastTransitionTime")
        else rfc3339(now)
    )
    condition: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:_MESSAGE_LIMIT],
        "lastTransitionTime": since,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    result.append(condition)
    order: dict[str, int] = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(result, key=lambda c: order.get(str(c.get("type")), len(order)))


@dataclass(frozen=True)
class Outcome:
    """What the Job and Pods say, before it is spelled as conditions."""

    phase: str
    reason: str
    message: str
    running: bool = False


def parse_termination_message(message: str | None) -> tuple[dict[str, Any] | None, str]:
    """The trainer's result (camelCase) from a termination message, and a text for people.

    With FallbackToLogsOnError the message may be the tail of the log instead of JSON; then the
    result is None and the text is the log's last lines.
    """
    if not message:
        return None, ""
    try:
        data = json.loads(message)
        result = TrainerResult.model_validate(data)
    except (ValueError, ValidationError):
        tail = "\n".join(message.strip().splitlines()[-5:])
        return None, tail[-_MESSAGE_LIMIT:]
    dumped = result.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped, result.message


def _trainer_status(pod: Obj) -> Obj | None:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == TRAINER_CONTAINER), None)


def _terminated(pod: Obj) -> Obj | None:
    status = _trainer_status(pod)
    if status is None:
        return None
    state = status.get("state", {}).get("terminated")
    return state if state else status.get("lastState", {}).get("terminated") or None


def _exit_code(pod: Obj | None) -> int | None:
    code = (_terminated(pod) or {}).get("exitCode") if pod is not None else None
    return None if code is None else int(code)


def _pod_time(pod: Obj) -> str:
    return str(pod.get("metadata", {}).get("creationTimestamp") or "")


def _job_condition(job: Obj, *types: str) -> Obj | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return dict(condition)
    return None


def _failure_reason(exit_code: int | None, terminated: Obj | None) -> str | None:
    if terminated is not None and terminated.get("reason") == Reason.OOM_KILLED:
        return Reason.OOM_KILLED
    if exit_code is None:
        return None
    try:
        return EXIT_CODE_REASONS.get(ExitCode(exit_code))
    except ValueError:
        return None


#: Where the kubelet names the Secret it could not read: ``secret "x" not found`` or
#: ``couldn't find key k in Secret ns/x`` (the local node agent: ``secret 'x' not found``,
#: ``key 'k' not found in secret 'x'``).
_SECRET_IN_MESSAGE: Final = re.compile(r"""secret ["']([^"']+)["']|in Secret [^/\s]+/(\S+)""", re.I)


#: Where a FineTuneJob's spec names Secrets (the watch cache keeps these, controller.py).
SECRET_REFERENCE_PATHS: Final = (
    ("model", "tokenSecretRef"),
    ("output", "pushToHub", "tokenSecretRef"),
    ("tracking", "mlflow", "usernameSecretRef"),
    ("tracking", "mlflow", "passwordSecretRef"),
    ("tracking", "mlflow", "tokenSecretRef"),
    ("objectStore", "accessKeyIdSecretRef"),
    ("objectStore", "secretAccessKeySecretRef"),
    ("objectStore", "sessionTokenSecretRef"),
)


def secret_reference_fields(spec: Obj) -> list[tuple[str, str]]:
    """(field, Secret name) of every Secret reference in a FineTuneJob's spec, as written."""

    def at(*path: str) -> Any:
        value: Any = spec
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    found: list[tuple[str, str]] = []
    for path in SECRET_REFERENCE_PATHS:
        name = at(*path, "name")
        if isinstance(name, str):
            found.append(("spec." + ".".join(path), name))
    return found


def _missing_secret_message(kubelet_message: str, spec: Obj) -> str:
    """A fixed message naming the fields whose Secret the pod can't read. The kubelet's own words
    say whether the Secret or only its key is missing, which a creator who may not read Secrets
    must not learn (the reference is the creator's; its target's existence is not)."""
    match = _SECRET_IN_MESSAGE.search(kubelet_message)
    name = (match.group(1) or match.group(2)) if match else None
    fields = [field for field, ref in secret_reference_fields(spec) if ref == name]
    where = ", ".join(fields) if fields else "a Secret reference of the spec"
    return (
        f"{where}: the Secret or its key is not available to the trainer pod "
        "(the pod starts once it is)"
    )


def _pending_problem(pods: Sequence[Obj], spec: Obj | None = None) -> tuple[str, str] | None:
    for pod in pods:
        for condition in pod.get("status", {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return Reason.UNSCHEDULABLE, str(condition.get("message") or "no node fits the pod")
        status = _trainer_status(pod)
        waiting = (status or {}).get("state", {}).get("waiting") or {}
        reason = _WAITING_PROBLEMS.get(str(waiting.get("reason")))
        if reason is not None:
            message = str(waiting.get("message") or waiting.get("reason"))
            if reason == Reason.CREATE_CONTAINER_CONFIG_ERROR and (
                "not found" in message or "couldn't find key" in message
            ):
                # A Secret (or its key) the spec names is missing: the kubelet retries, and the
                # pod starts once it exists.
                return Reason.MISSING_REFERENCE, _missing_secret_message(message, spec or {})
            return reason, message
    return None


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


def node_rank(pod: Obj) -> int | None:
    value = (pod.get("metadata", {}).get("labels") or {}).get(COMPLETION_INDEX_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


def _rank_zero(pods: Sequence[Obj]) -> Obj | None:
    """Rank 0's pod, the newest if the Job replaced it: it carries the group's result."""
    zeros = [p for p in pods if node_rank(p) == 0]
    return max(zeros, key=_pod_time) if zeros else None


def _failing_pod(pods: Sequence[Obj], group: bool) -> Obj | None:
    """The pod whose failure tells why the Job failed.

    One pod (retried): the newest that failed. A group: a rank that exited with a code no retry
    fixes, else the rank that failed first (the others were stopped because of it).
    """
    failed = [p for p in pods if (_terminated(p) or {}).get("exitCode", 0) != 0]
    if group and failed:
        fatal = [p for p in failed if _exit_code(p) in NON_RETRIABLE_EXIT_CODES]
        return min(fatal or failed, key=lambda p: str((_terminated(p) or {}).get("finishedAt")))
    by_age = sorted(pods, key=_pod_time)
    return next(
        (p for p in reversed(by_age) if (_terminated(p) or {}).get("exitCode", 0) != 0),
        None,
    ) or next((p for p in reversed(by_age) if p.get("status", {}).get("phase") == "Failed"), None)


def group_restart_due(ftj: Obj, job: Obj | None, pods: Sequence[Obj]) -> bool:
    """Whether a multi-pod group's Job failed in a way the next attempt may fix, with attempts
    left: then the operator replaces the Job (the whole group restarts from its checkpoint)."""
    if job is None or nodes_of(ftj) <= 1:
        return False
    failed = _job_condition(job, "Failed", "FailureTarget")
    if failed is None or _job_condition(job, "Complete", "SuccessCriteriaMet") is not None:
        return False
    if str(failed.get("reason")) in ("PodFailurePolicy", Reason.DEADLINE_EXCEEDED):
        return False  # a non-retriable exit on a rank, or the run's deadline: final
    if _exit_code(_failing_pod(pods, group=True)) in NON_RETRIABLE_EXIT_CODES:
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
    if _job_condition(job, "Failed", "FailureTarget", "Complete", "SuccessCriteriaMet"):
        return False
    if job.get("spec", {}).get("suspend") or not _attempts_left(ftj, job):
        return False  # suspending stops the pods too; or no attempt follows
    if any(_exit_code(pod) in NON_RETRIABLE_EXIT_CODES for pod in pods):
        return False
    return any(
        pod.get("metadata", {}).get("deletionTimestamp") or (_exit_code(pod) or 0) != 0
        for pod in pods
    )


def _group_retrying(ftj: Obj, job: Obj, pods: Sequence[Obj]) -> Outcome:
    pod = _failing_pod(pods, group=True) or next(
        (p for p in pods if p.get("metadata", {}).get("deletionTimestamp")), None
    )
    terminated = _terminated(pod) if pod is not None else None
    code = terminated.get("exitCode") if terminated else None
    why = _failure_reason(code, terminated) or "a pod was lost"
    rank = node_rank(pod) if pod is not None else None
    where = f" on node rank {rank}" if rank is not None else ""
    return Outcome(
        "Pending",
        Reason.RETRYING,
        f"group attempt {group_attempt(job)} failed ({why}{where}): restarting all "
        f"{nodes_of(ftj)} pods from the newest checkpoint",
    )


def _outcome(ftj: Obj, job: Obj | None, pods: Sequence[Obj]) -> tuple[Outcome, Obj | None]:
    """The outcome, and the pod whose termination message tells the result (if any)."""
    if job is None:
        return Outcome("Pending", Reason.CREATING, "creating the trainer Job"), None
    group = nodes_of(ftj) > 1
    by_age = sorted(pods, key=_pod_time)
    done = _job_condition(job, "Complete", "SuccessCriteriaMet")
    if done is not None:
        winner = (
            _rank_zero(pods)
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
    failed = _job_condition(job, "Failed", "FailureTarget")
    if failed is not None:
        # The pod that failed: its trainer has terminated, though the pod may not be Failed yet
        # when the Job's FailureTarget condition comes first.
        last = _failing_pod(pods, group)
        job_reason = str(failed.get("reason") or "Failed")
        # A Job condition without a message still fails with words a person can read.
        job_message = str(failed.get("message") or f"the trainer Job failed ({job_reason})")
        terminated = _terminated(last) if last is not None else None
        exit_code = terminated.get("exitCode") if terminated else None
        reason = job_reason
        if job_reason not in (Reason.DEADLINE_EXCEEDED,):
            reason = _failure_reason(exit_code, terminated) or job_reason
        if reason == "PodFailurePolicy":
            reason = Reason.TRAINER_ERROR
        message = job_message
        if exit_code is not None and reason != job_reason:
            message = f"the trainer exited with code {exit_code}"
        return Outcome("Failed", reason, message), last
    spec = job.get("spec", {})
    if spec.get("suspend"):
        queue = ftj.get("spec", {}).get("scheduling", {}).get("queueName")
        user_suspended = ftj.get("spec", {}).get("runPolicy", {}).get("suspend", False)
        if queue and not user_suspended:
            return Outcome("Queued", Reason.QUEUED, f"waiting for admission by queue {queue}"), None
        return Outcome("Suspended", Reason.SUSPENDED, "suspended by spec.runPolicy.suspend"), None
    running = [
        p
        for p in pods
        if p.get("status", {}).get("phase") == "Running"
        and not p.get("metadata", {}).get("deletionTimestamp")
        and ((_trainer_status(p) or {}).get("state", {}).get("running") is not None)
    ]
    if running:
        text = "the trainer is running"
        if group:
            text = f"the trainer is running ({len(running)} of {nodes_of(ftj)} pods)"
        return Outcome("Running", Reason.RUNNING, text, running=True), None
    problem = _pending_problem(
        [p for p in pods if p.get("status", {}).get("phase") == "Pending"], ftj.get("spec") or {}
    )
    if problem is not None:
        return Outcome("Pending", problem[0], problem[1]), None
    failed_pods = [p for p in by_age if p.get("status", {}).get("phase") == "Failed"]
    if failed_pods:
        terminated = _terminated(failed_pods[-1])
        code = terminated.get("exitCode") if terminated else None
        reason = _failure_reason(code, terminated) or Reason.TRAINER_ERROR
        return (
            Outcome("Pending", Reason.RETRYING, f"attempt {len(failed_pods)} failed ({reason})"),
            None,
        )
    if any(
        p.get("status", {}).get("phase") == "Succeeded"
        or ((_trainer_status(p) or {}).get("state", {}).get("terminated") or {}).get("exitCode")
        == 0
        for p in pods
    ):
        # The trainer is done but the Job controller hasn't marked the Job Complete yet: still
        # Running, not back to Pending (that flap would post two misleading events).
        return Outcome(
            "Running", Reason.FINISHING, "the trainer finished; completing the Job"
        ), None
    return Outcome("Pending", Reason.STARTING, "waiting for the trainer pod to start"), None


def pod_started_at(pods: Sequence[Obj]) -> datetime | None:
    """When the newest pod was started on its node (its ``status.startTime``)."""
    times = [
        parse_rfc3339(str(pod["status"]["startTime"]))
        for pod in pods
        if (pod.get("status") or {}).get("startTime")
    ]
    return max(times) if times else None


def trainer_finished_at(pods: Sequence[Obj]) -> datetime | None:
    """When the last trainer that exited 0 finished (None: none did, or it gave no time)."""
    times = [
        parse_rfc3339(str(state["finishedAt"]))
        for state in (_terminated(pod) for pod in pods)
        if state and state.get("exitCode") == 0 and state.get("finishedAt")
    ]
    return max(times) if times else None


def _started_at(pods: Sequence[Obj]) -> str | None:
    times: list[str] = []
    for pod in pods:
        state = (_trainer_status(pod) or {}).get("state", {})
        for key in ("running", "terminated"):
            started = (state.get(key) or {}).get("startedAt")
            if started:
                times.append(str(started))
    return min(times) if times else None


#: What the validation Job's pods may say that the Validating phase reports as it is.
_VALIDATION_KEEPS: Final = ("Failed", "Suspended")


def _validating(outcome: Outcome, job: Obj) -> Outcome:
    """The validation Job's outcome as the FineTuneJob's: Validating until it fails (or is
    suspended); a problem with its pod (unschedulable, image, secret) is Pending with its
    reason, as for the trainer's pod."""
    if outcome.phase in _VALIDATION_KEEPS:
        return outcome
    if outcome.phase == "Pending" and outcome.reason in _PROBLEM_REASONS - {Reason.RETRYING}:
        return outcome  # Pending, as for the trainer's pod: a person has something to fix
    name = job.get("metadata", {}).get("name")
    message = f"checking the data and estimating the run (Job {name}, no GPU)"
    return Outcome("Validating", Reason.VALIDATING, message)


def validation_estimate(job: Obj, pods: Sequence[Obj]) -> dict[str, Any] | None:
    """``status.estimate`` from the finished validation Job's termination message (None when
    the Job hasn't succeeded, or its trainer wrote no estimate)."""
    outcome, pod = _outcome({}, job, pods)
    if outcome.phase != "Succeeded" or pod is None:
        return None
    terminated = _terminated(pod)
    result, _ = parse_termination_message(
        str(terminated.get("message") or "") if terminated else None
    )
    estimate = (result or {}).get("estimate")
    return dict(estimate) if isinstance(estimate, dict) else None


def validation_succeeded(job: Obj) -> bool:
    return _job_condition(job, "Complete", "SuccessCriteriaMet") is not None


def derive_status(
    ftj: Obj, job: Obj | None, pods: Sequence[Obj], now: datetime, *, validating: bool = False
) -> dict[str, Any]:
    """The FineTuneJob's status (without ``progress``, which the trainer writes) from its Job
    and that Job's Pods; ``validating``: from the Validating phase's Job (which has not
    succeeded) and its Pods, before any trainer Job exists."""
    current = ftj.get("status") or {}
    generation = ftj.get("metadata", {}).get("generation")
    outcome, reporting_pod = _outcome(ftj, job, pods)
    if validating and job is not None:
        outcome = _validating(outcome, job)

    result = None
    message = outcome.message
    if reporting_pod is not None:
        terminated = _terminated(reporting_pod)
        result, text = parse_termination_message(
            str(terminated.get("message") or "") if terminated else None
        )
        if text and outcome.phase == "Failed":
            message = f"{message}: {text}" if message else text
        rank = node_rank(reporting_pod)
        if outcome.phase == "Failed" and nodes_of(ftj) > 1 and rank is not None:
            message = f"node rank {rank}: {message}"
        if result is not None and outcome.phase == "Failed":
            # The trainer names its own failure best, unless the Job's deadline ended it.
            reason = str(result.get("reason") or "")
            if reason and outcome.reason not in (Reason.DEADLINE_EXCEEDED, Reason.OOM_KILLED):
                outcome = Outcome(outcome.phase, reason, outcome.message)

    phase = outcome.phase
    conditions: Sequence[Mapping[str, Any]] = current.get("conditions") or []

    def put(type_: str, status: bool, reason: str, text: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, status, reason=reason, message=text, now=now, generation=generation
        )

    finished = phase in ("Succeeded", "Failed")
    put(
        READY,
        outcome.running or phase == "Succeeded",
        outcome.reason,
        message,
    )
    put(
        RUNNING, outcome.running, outcome.reason if not outcome.running else Reason.RUNNING, message
    )
    put(
        SUCCEEDED,
        phase == "Succeeded",
        Reason.SUCCEEDED
        if phase == "Succeeded"
        else (Reason.NOT_SUCCEEDED if finished else Reason.IN_PROGRESS),
        message if phase == "Succeeded" else "",
    )
    put(
        FAILED,
        phase == "Failed",
        outcome.reason if phase == "Failed" else Reason.NO_FAILURE,
        message,
    )
    put(
        SUSPENDED,
        phase in ("Suspended", "Queued"),
        outcome.reason if phase in ("Suspended", "Queued") else Reason.NOT_SUSPENDED,
        message if phase in ("Suspended", "Queued") else "",
    )

    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": list(conditions),
    }
    status["worldSize"] = world_size_of(ftj)
    if job is not None and validating:
        pass  # the Validating phase's Job is not an attempt: no jobName, podName or attempts
    elif job is not None and nodes_of(ftj) > 1:
        # One Job per group attempt; the pod to read (kubectl logs) is rank 0's.
        status["jobName"] = job.get("metadata", {}).get("name")
        status["attempts"] = max(group_attempt(job), int(current.get("attempts") or 0))
        rank_zero = _rank_zero(pods)
        if rank_zero is not None:
            status["podName"] = rank_zero.get("metadata", {}).get("name")
        elif current.get("podName"):
            status["podName"] = current.get("podName")
    elif job is not None:
        status["jobName"] = job.get("metadata", {}).get("name")
        job_status = job.get("status", {})
        counted = int(job_status.get("succeeded") or 0) + int(job_status.get("failed") or 0)
        started_pods = sorted(
            (p for p in pods if p.get("status", {}).get("startTime")), key=_pod_time
        )
        attempts = max(counted, len(started_pods), int(current.get("attempts") or 0))
        previous_pod = current.get("podName")
        if started_pods:
            newest = str(started_pods[-1].get("metadata", {}).get("name"))
            # An evicted pod is gone before its replacement starts, and the Job doesn't count
            # ignored disruptions: a pod name we haven't seen is what tells a new attempt.
            if previous_pod and newest != previous_pod:
                attempts = max(attempts, int(current.get("attempts") or 0) + 1)
            status["podName"] = newest
        elif previous_pod:
            status["podName"] = previous_pod
        status["attempts"] = attempts
    start = current.get("startTime") or (None if validating else _started_at(pods))
    if start:
        status["startTime"] = start
    if finished:
        status["completionTime"] = (
            current.get("completionTime")
            or (job or {}).get("status", {}).get("completionTime")
            or rfc3339(now)
        )
    if result is not None:
        status["result"] = result
    elif finished and phase == "Failed":
        status["result"] = {"outcome": "Failed", "reason": outcome.reason, "message": message}
    return status


def ttl_remaining(status: Obj, ttl_seconds: int | None, now: datetime) -> float | None:
    """Seconds until a finished FineTuneJob is due for deletion (<= 0: now); None: never."""
    if ttl_seconds is None or status.get("phase") not in ("Succeeded", "Failed"):
        return None
    completed = status.get("completionTime")
    if not completed:
        return None
    finished_at = parse_rfc3339(str(completed))
    return ttl_seconds - (now - finished_at).total_seconds()


def transition(old: Obj, new: Obj) -> tuple[str, str, str] | None:
    """(event type, reason, message) when the phase changed, or when a problem a person has to
    see (Unschedulable, ImagePullBackOff, a retried attempt, ...) appeared within one phase;
    else None. A reason that changes within a phase on the way (Starting, Finishing) is in the
    status conditions but gets no Event: one Event per phase change, not per reason."""
    old_phase, new_phase = old.get("phase"), new.get("phase")
    old_ready = _condition(old, READY)
    new_ready = _condition(new, READY)
    reason = str(new_ready.get("reason") or new_phase)
    if old_phase == new_phase and (
        old_ready.get("reason") == new_ready.get("reason") or reason not in _PROBLEM_REASONS
    ):
        return None
    message = str(new_ready.get("message") or "")
    kind = "Warning" if new_phase == "Failed" or reason in _PROBLEM_REASONS else "Normal"
    text = f"{old_phase or 'New'} → {new_phase}" + (f": {message}" if message else "")
    return kind, reason, text


_PROBLEM_REASONS: Final = {
    Reason.UNSCHEDULABLE,
    Reason.IMAGE_PULL_BACK_OFF,
    Reason.CREATE_CONTAINER_CONFIG_ERROR,
    Reason.CREATE_CONTAINER_ERROR,
    Reason.RETRYING,
    Reason.MISSING_REFERENCE,
}


def _condition(status: Obj, type_: str) -> Obj:
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return {}
