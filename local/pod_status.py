"""A pod's status as a kubelet reports it: phase, conditions, container states and the
termination message."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.contract import TERMINATION_MESSAGE_LIMIT
from kubetune.api.timestamps import rfc3339
from kubetune.local.rest import JSON

FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def container_state(kind: str, **fields: Any) -> JSON:
    """``{kind: fields}`` as a container's ``state`` (waiting, running or terminated)."""
    # Strategic merge patches merge maps: the states not in use are nulled
    # explicitly, or a container would end up both running and terminated.
    state: JSON = {"waiting": None, "running": None, "terminated": None}
    state[kind] = fields
    return state


@dataclass
class ContainerRecord:
    """One container of the pod, across restarts."""

    spec: JSON
    init: bool
    restart_count: int = 0
    process: subprocess.Popen[bytes] | None = None
    status: JSON = field(default_factory=dict)
    log_paths: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        """The exit code of its last run, None while it has not terminated."""
        terminated = (self.status.get("state") or {}).get("terminated") or {}
        code = terminated.get("exitCode")
        return None if code is None else int(code)

    def reset_status(self, state: JSON) -> None:
        self.status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": self.restart_count,
            "started": False,
            "state": state,
        }


class PodStatus:
    """The ``status`` of one pod, kept as the node reports it."""

    def __init__(self, host_ip: str, pod_ip: str | None = None) -> None:
        pod_ip = pod_ip or host_ip
        self.fields: JSON = {
            "phase": "Pending",
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": rfc3339(),
            "conditions": [],
        }

    @property
    def phase(self) -> str:
        return str(self.fields["phase"])

    def set_condition(self, kind: str, status: str, reason: str | None = None) -> None:
        conditions: list[JSON] = self.fields["conditions"]
        for condition in conditions:
            if condition["type"] == kind:
                if condition["status"] != status:
                    condition["lastTransitionTime"] = rfc3339()
                condition.update(status=status, reason=reason)
                return
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "lastProbeTime": None,
                "lastTransitionTime": rfc3339(),
            }
        )

    def mark_pending(self, records: Iterable[ContainerRecord]) -> None:
        """Every container waiting to be created, init containers first."""
        records = list(records)
        has_init = any(r.init for r in records)
        for record in records:
            reason = "PodInitializing" if record.init or has_init else "ContainerCreating"
            record.reset_status(container_state("waiting", reason=reason))
        self.set_condition("PodReadyToStartContainers", "False")
        self.set_condition(
            "Initialized",
            "False" if has_init else "True",
            "ContainersNotInitialized" if has_init else None,
        )
        self.set_condition("ContainersReady", "False", "ContainersNotReady")
        self.set_condition("Ready", "False", "ContainersNotReady")

    def mark_running(self) -> None:
        self.fields["phase"] = "Running"

    def mark_failed(self, reason: str, message: str) -> None:
        self.fields.update(phase="Failed", reason=reason, message=message)

    def mark_finished(
        self, records: Iterable[ContainerRecord], stop_reason: tuple[str, str] | None
    ) -> None:
        """Succeeded when every (non-init) container exited 0 and nothing stopped the pod."""
        # Containers that never started (after a failed init container, or a
        # deletion first) keep their waiting state, as with a kubelet.
        succeeded = all(r.exit_code() == 0 for r in records if not r.init)
        if stop_reason is not None:
            self.fields["reason"], self.fields["message"] = stop_reason
            succeeded = False
        self.fields["phase"] = "Succeeded" if succeeded else "Failed"
        self.set_condition("ContainersReady", "False", "PodCompleted")
        self.set_condition("Ready", "False", "PodCompleted")
        self.set_condition("PodReadyToStartContainers", "False")

    def document(self, records: Iterable[ContainerRecord]) -> JSON:
        """The whole status, with readiness brought up to date from the running processes."""
        records = list(records)
        main = [r for r in records if not r.init]
        for record in records:
            record.status["ready"] = (not record.init) and record.running()
        if self.fields["phase"] == "Running":
            ready = all(r.running() for r in main)
            reason = None if ready else "ContainersNotReady"
            self.set_condition("ContainersReady", "True" if ready else "False", reason)
            self.set_condition("Ready", "True" if ready else "False", reason)
        return {
            **self.fields,
            "initContainerStatuses": [dict(r.status) for r in records if r.init],
            "containerStatuses": [dict(r.status) for r in main],
        }


def termination_message(spec: JSON, termination_file: Path, log_path: Path, exit_code: int) -> str:
    """What the container wrote to its termination-log file (at most 4 KiB); with
    ``FallbackToLogsOnError``, the tail of its log when it failed and wrote nothing."""
    try:
        with termination_file.open("rb") as handle:
            message = handle.read(TERMINATION_MESSAGE_LIMIT)
    except OSError:
        message = b""
    if (
        not message
        and exit_code != 0
        and (spec.get("terminationMessagePolicy") == "FallbackToLogsOnError")
    ):
        with contextlib.suppress(OSError):
            lines = log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            message = b"\n".join(lines)[-FALLBACK_LOG_BYTES:]
    return message.decode(errors="replace")
