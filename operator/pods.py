"""What a Job's Pods say: the trainer container's state, exit code and termination message,
why a pod waits, which pod is rank 0 or failed, and when trainers started and finished. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from kubetune.api.contract import (
    COMPLETION_INDEX_LABEL,
    EXIT_CODE_REASONS,
    NON_RETRIABLE_EXIT_CODES,
    TRAINER_CONTAINER,
    ExitCode,
    Reason,
)
from kubetune.api.documents import load_json_from_a_pod
from kubetune.api.models import TrainerResult
from kubetune.api.timestamps import parse_rfc3339
from kubetune.operator.objects import Obj

_WAITING_PROBLEMS: Final = {
    "ImagePullBackOff": Reason.IMAGE_PULL_BACK_OFF,
    "ErrImagePull": Reason.IMAGE_PULL_BACK_OFF,
    "InvalidImageName": Reason.IMAGE_PULL_BACK_OFF,
    "CreateContainerConfigError": Reason.CREATE_CONTAINER_CONFIG_ERROR,
    "CreateContainerError": Reason.CREATE_CONTAINER_ERROR,
}
MESSAGE_LIMIT: Final = 1024


def parse_termination_message(message: str | None) -> tuple[dict[str, Any] | None, str]:
    """The trainer's result (camelCase) from a termination message, and a text for people.

    With FallbackToLogsOnError the message may be the tail of the log instead of JSON; then the
    result is None and the text is the log's last lines.
    """
    if not message:
        return None, ""
    try:
        data = load_json_from_a_pod(message, "the termination message")
        result = TrainerResult.model_validate(data)
    except (ValueError, ValidationError):
        tail = "\n".join(message.strip().splitlines()[-5:])
        return None, tail[-MESSAGE_LIMIT:]
    dumped = result.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped, result.message


def trainer_container_status(pod: Obj) -> Obj | None:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == TRAINER_CONTAINER), None)


def terminated_state(pod: Obj) -> Obj | None:
    status = trainer_container_status(pod)
    if status is None:
        return None
    state = status.get("state", {}).get("terminated")
    return state if state else status.get("lastState", {}).get("terminated") or None


def exit_code_of(pod: Obj | None) -> int | None:
    code = (terminated_state(pod) or {}).get("exitCode") if pod is not None else None
    return None if code is None else int(code)


def pod_time(pod: Obj) -> str:
    return str(pod.get("metadata", {}).get("creationTimestamp") or "")


def job_condition(job: Obj, *types: str) -> Obj | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return dict(condition)
    return None


def failure_reason(exit_code: int | None, terminated: Obj | None) -> str | None:
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


def pending_problem(pods: Sequence[Obj], spec: Obj | None = None) -> tuple[str, str] | None:
    for pod in pods:
        for condition in pod.get("status", {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return Reason.UNSCHEDULABLE, str(condition.get("message") or "no node fits the pod")
        status = trainer_container_status(pod)
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


def node_rank(pod: Obj) -> int | None:
    value = (pod.get("metadata", {}).get("labels") or {}).get(COMPLETION_INDEX_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


def rank_zero_pod(pods: Sequence[Obj]) -> Obj | None:
    """Rank 0's pod, the newest if the Job replaced it: it carries the group's result."""
    zeros = [p for p in pods if node_rank(p) == 0]
    return max(zeros, key=pod_time) if zeros else None


def failing_pod(pods: Sequence[Obj], group: bool) -> Obj | None:
    """The pod whose failure tells why the Job failed.

    One pod (retried): the newest that failed. A group: a rank that exited with a code no retry
    fixes, else the rank that failed first (the others were stopped because of it).
    """
    failed = [p for p in pods if (terminated_state(p) or {}).get("exitCode", 0) != 0]
    if group and failed:
        fatal = [p for p in failed if exit_code_of(p) in NON_RETRIABLE_EXIT_CODES]
        return min(
            fatal or failed, key=lambda p: str((terminated_state(p) or {}).get("finishedAt"))
        )
    by_age = sorted(pods, key=pod_time)
    return next(
        (p for p in reversed(by_age) if (terminated_state(p) or {}).get("exitCode", 0) != 0),
        None,
    ) or next((p for p in reversed(by_age) if p.get("status", {}).get("phase") == "Failed"), None)


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
        for state in (terminated_state(pod) for pod in pods)
        if state and state.get("exitCode") == 0 and state.get("finishedAt")
    ]
    return max(times) if times else None


def trainer_started_at(pods: Sequence[Obj]) -> str | None:
    times: list[str] = []
    for pod in pods:
        state = (trainer_container_status(pod) or {}).get("state", {})
        for key in ("running", "terminated"):
            started = (state.get(key) or {}).get("startedAt")
            if started:
                times.append(str(started))
    return min(times) if times else None
