"""The batch/v1 Job and its Pods → the FineTuneJob's status. Pure: data in, a status patch out."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from kubetune.api.contract import (
    CONDITION_TYPES,
    ConditionType,
    Reason,
)
from kubetune.api.models import FineTuneJobStatus
from kubetune.api.timestamps import parse_rfc3339, rfc3339
from kubetune.operator.objects import Obj
from kubetune.operator.outcome import (
    PROBLEM_REASONS,
    Outcome,
    as_validating,
    group_attempt,
    nodes_of,
    outcome_of,
    world_size_of,
)
from kubetune.operator.pods import (
    MESSAGE_LIMIT,
    node_rank,
    parse_termination_message,
    pod_time,
    rank_zero_pod,
    terminated_state,
    trainer_started_at,
)

READY: Final = ConditionType.READY
RUNNING: Final = ConditionType.RUNNING
SUCCEEDED: Final = ConditionType.SUCCEEDED
FAILED: Final = ConditionType.FAILED
SUSPENDED: Final = ConditionType.SUSPENDED
#: A condition's reason as the operator writes them: one CamelCase word (Kubernetes allows more).
_CONDITION_REASON: Final = re.compile(r"[A-Z][A-Za-z0-9]{0,127}")


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
    return set_conditions(conditions, ((type_, status, reason, message),), now, generation)


#: Where each condition type goes in the list (others after them, in their own order).
_ORDER: Final[dict[str, int]] = {str(t): i for i, t in enumerate(CONDITION_TYPES)}


def set_conditions(
    conditions: Sequence[Mapping[str, Any]],
    wanted: Sequence[tuple[str, bool, str, str]],
    now: datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with each ``(type, status, reason, message)`` of ``wanted`` set, as
    ``set_condition`` one after the other would (one pass, one sort)."""
    types = {type_ for type_, _, _, _ in wanted}
    result = [dict(c) for c in conditions if c.get("type") not in types]
    stamp: str | None = None
    for type_, status, reason, message in wanted:
        value = "True" if status else "False"
        previous = next((c for c in conditions if c.get("type") == type_), None)
        if (
            previous is not None
            and previous.get("status") == value
            and previous.get("lastTransitionTime")
        ):
            since = previous["lastTransitionTime"]
        else:
            stamp = since = stamp or rfc3339(now)
        condition: dict[str, Any] = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message[:MESSAGE_LIMIT],
            "lastTransitionTime": since,
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        result.append(condition)
    last = len(_ORDER)
    return sorted(result, key=lambda c: _ORDER.get(str(c.get("type")), last))


def derive_status(
    ftj: Obj, job: Obj | None, pods: Sequence[Obj], now: datetime, *, validating: bool = False
) -> dict[str, Any]:
    """The FineTuneJob's status (without ``progress``, which the trainer writes) from its Job
    and that Job's Pods; ``validating``: from the Validating phase's Job (which has not
    succeeded) and its Pods, before any trainer Job exists."""
    current = ftj.get("status") or {}
    generation = ftj.get("metadata", {}).get("generation")
    outcome, reporting_pod = outcome_of(ftj, job, pods)
    if validating and job is not None:
        outcome = as_validating(outcome, job)
    outcome, message, result = _reported(ftj, outcome, reporting_pod)
    phase = outcome.phase
    finished = phase in ("Succeeded", "Failed")
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": _conditions(current, outcome, message, now, generation),
        "worldSize": world_size_of(ftj),
    }
    if job is not None and not validating:
        # The Validating phase's Job is not an attempt: no jobName, podName or attempts.
        status.update(_attempt(ftj, job, pods, current))
    start = current.get("startTime") or (None if validating else trainer_started_at(pods))
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


def _reported(
    ftj: Obj, outcome: Outcome, pod: Obj | None
) -> tuple[Outcome, str, dict[str, Any] | None]:
    """The outcome, message and result once the reporting pod's termination message is read:
    a failure's message gains the trainer's words (and the node rank), its reason the trainer's
    own unless the deadline or the OOM killer ended it."""
    message = outcome.message
    if pod is None:
        return outcome, message, None
    terminated = terminated_state(pod)
    result, text = parse_termination_message(
        str(terminated.get("message") or "") if terminated else None
    )
    if text and outcome.phase == "Failed":
        message = f"{message}: {text}" if message else text
    rank = node_rank(pod)
    if outcome.phase == "Failed" and nodes_of(ftj) > 1 and rank is not None:
        message = f"node rank {rank}: {message}"
    if result is not None and outcome.phase == "Failed":
        # The trainer names its own failure best, unless the Job's deadline ended it.
        reason = str(result.get("reason") or "")
        # Whatever the pod wrote is the tenant's: only a one-word CamelCase reason, as a
        # condition's reason must be, replaces the operator's own.
        if _CONDITION_REASON.fullmatch(reason) and outcome.reason not in (
            Reason.DEADLINE_EXCEEDED,
            Reason.OOM_KILLED,
        ):
            outcome = Outcome(outcome.phase, reason, outcome.message)
    return outcome, message, result


def _conditions(
    current: Obj, outcome: Outcome, message: str, now: datetime, generation: Any
) -> list[Mapping[str, Any]]:
    """The five conditions, each as the outcome says (``lastTransitionTime`` kept unless its
    status flips)."""
    phase = outcome.phase
    finished = phase in ("Succeeded", "Failed")
    held = phase in ("Suspended", "Queued")
    conditions: Sequence[Mapping[str, Any]] = current.get("conditions") or []
    wanted = (
        (READY, outcome.running or phase == "Succeeded", outcome.reason, message),
        (RUNNING, outcome.running, Reason.RUNNING if outcome.running else outcome.reason, message),
        (
            SUCCEEDED,
            phase == "Succeeded",
            Reason.SUCCEEDED
            if phase == "Succeeded"
            else (Reason.NOT_SUCCEEDED if finished else Reason.IN_PROGRESS),
            message if phase == "Succeeded" else "",
        ),
        (
            FAILED,
            phase == "Failed",
            outcome.reason if phase == "Failed" else Reason.NO_FAILURE,
            message,
        ),
        (
            SUSPENDED,
            held,
            outcome.reason if held else Reason.NOT_SUSPENDED,
            message if held else "",
        ),
    )
    return list(set_conditions(conditions, wanted, now, generation))


def _attempt(ftj: Obj, job: Obj, pods: Sequence[Obj], current: Obj) -> dict[str, Any]:
    """``jobName``, ``podName`` and ``attempts`` of the trainer's Job."""
    fields: dict[str, Any] = {"jobName": job.get("metadata", {}).get("name")}
    if nodes_of(ftj) > 1:
        # One Job per group attempt; the pod to read (kubectl logs) is rank 0's.
        fields["attempts"] = max(group_attempt(job), int(current.get("attempts") or 0))
        rank_zero = rank_zero_pod(pods)
        if rank_zero is not None:
            fields["podName"] = rank_zero.get("metadata", {}).get("name")
        elif current.get("podName"):
            fields["podName"] = current.get("podName")
        return fields
    job_status = job.get("status", {})
    counted = int(job_status.get("succeeded") or 0) + int(job_status.get("failed") or 0)
    started_pods = sorted((p for p in pods if p.get("status", {}).get("startTime")), key=pod_time)
    attempts = max(counted, len(started_pods), int(current.get("attempts") or 0))
    previous_pod = current.get("podName")
    if started_pods:
        newest = str(started_pods[-1].get("metadata", {}).get("name"))
        # An evicted pod is gone before its replacement starts, and the Job doesn't count
        # ignored disruptions: a pod name we haven't seen is what tells a new attempt.
        if previous_pod and newest != previous_pod:
            attempts = max(attempts, int(current.get("attempts") or 0) + 1)
        fields["podName"] = newest
    elif previous_pod:
        fields["podName"] = previous_pod
    fields["attempts"] = attempts
    return fields


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
        old_ready.get("reason") == new_ready.get("reason") or reason not in PROBLEM_REASONS
    ):
        return None
    message = str(new_ready.get("message") or "")
    kind = "Warning" if new_phase == "Failed" or reason in PROBLEM_REASONS else "Normal"
    text = f"{old_phase or 'New'} → {new_phase}" + (f": {message}" if message else "")
    return kind, reason, text


def _condition(status: Obj, type_: str) -> Obj:
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return {}


@dataclass(frozen=True)
class Rejection:
    """A problem no retry can fix: the job fails with this reason before anything is made."""

    reason: str
    problems: tuple[str, ...]

    @property
    def message(self) -> str:
        return "; ".join(self.problems)


def rejected_status(ftj: Obj, rejection: Rejection, now: datetime) -> dict[str, Any]:
    """The status of a FineTuneJob failed for ``rejection``, built through the status model."""
    current = ftj.get("status") or {}
    generation = ftj.get("metadata", {}).get("generation")
    conditions: Sequence[Mapping[str, Any]] = current.get("conditions") or []
    for type_, value in ((ConditionType.READY, False), (ConditionType.FAILED, True)):
        conditions = set_condition(
            conditions,
            type_,
            value,
            reason=rejection.reason,
            message=rejection.message,
            now=now,
            generation=generation,
        )
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Failed",
            "observedGeneration": generation,
            "conditions": conditions,
            "completionTime": current.get("completionTime") or rfc3339(now),
            "result": {
                "outcome": "Failed",
                "reason": rejection.reason,
                "message": rejection.message[:1024],
            },
        }
    )
    return status.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")
