"""Runs one pod bound to the local node as host processes and reports its
status as a kubelet does.

Each container is a process tree started by bubblewrap in its own mount
namespace: the host's root is bound in (so the host environment, where kubetune
is installed, is the "image"), with the pod's volumes and the termination-log
file bound at their mount paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.local.container_env import EnvResolver, command_line
from kubetune.local.rest import JSON, STRATEGIC_MERGE_PATCH, ApiError, Rest, path_for
from kubetune.local.volumes import HostVolume, VolumeBuilder, VolumeNotReady

log = logging.getLogger(__name__)

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
MAX_RESTART_BACKOFF = 60.0


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(kind: str, **fields: Any) -> JSON:
    # Strategic merge patches merge maps: the states not in use are nulled
    # explicitly, or a container would end up both running and terminated.
    state: JSON = {"waiting": None, "running": None, "terminated": None}
    state[kind] = fields
    return state


@dataclass(frozen=True)
class NodeContext:
    """What every pod on one node shares."""

    node_name: str
    host_ip: str
    pods_dir: Path
    base_env: Mapping[str, str]
    memory_dir: Path  # on a host tmpfs, for emptyDir volumes with medium Memory
    device_paths: tuple[str, ...] = ()


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


class PodWorker(threading.Thread):
    """Drives one pod from Pending to Succeeded/Failed, or until it is deleted."""

    def __init__(
        self,
        rest: Rest,
        node: NodeContext,
        pod: JSON,
        env_extra: Mapping[str, str] | None = None,
        on_finished: Callable[[PodWorker], None] | None = None,
    ) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.rest = rest
        self.node = node
        self.pod = pod
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.pod_dir = node.pods_dir / self.uid
        self.env_extra = dict(env_extra or {})
        self.on_finished = on_finished
        self.restart_policy: str = pod["spec"].get("restartPolicy", "Always")
        self.containers = {
            c["name"]: ContainerRecord(c, init=True) for c in pod["spec"].get("initContainers", [])
        } | {c["name"]: ContainerRecord(c, init=False) for c in pod["spec"]["containers"]}
        self._lock = threading.RLock()
        self._stop_requested = threading.Event()
        self._grace = 30.0
        self._stop_reason: tuple[str, str] | None = None  # pod reason, message
        self.finished = threading.Event()
        self.status: JSON = {
            "phase": "Pending",
            "hostIP": node.host_ip,
            "hostIPs": [{"ip": node.host_ip}],
            "podIP": node.host_ip,
            "podIPs": [{"ip": node.host_ip}],
            "startTime": now(),
            "conditions": [],
        }

    # -- control from the node agent --------------------------------------------

    def request_stop(self, grace_seconds: float, reason: tuple[str, str] | None = None) -> None:
        """Stop the containers: SIGTERM, then SIGKILL after ``grace_seconds``."""
        with self._lock:
            if not self._stop_requested.is_set():
                self._grace = max(0.0, grace_seconds)
                self._stop_reason = reason
                self._stop_requested.set()
            else:
                self._grace = min(self._grace, max(0.0, grace_seconds))

    def log_path(self, container: str, previous: bool = False) -> Path | None:
        record = self.containers.get(container)
        if record is None or not record.log_paths:
            return None
        if previous:
            return record.log_paths[-2] if len(record.log_paths) > 1 else None
        return record.log_paths[-1]

    def container_running(self, container: str) -> bool:
        record = self.containers.get(container)
        return record is not None and record.running()

    # -- the pod's life ---------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:  # the node must survive any one pod's failure
            log.exception("pod %s/%s failed in the node agent", self.namespace, self.pod_name)
            with self._lock:
                self.status.update(phase="Failed", reason="NodeAgentError", message=str(error))
                self._publish()
        finally:
            self.finished.set()
            if self.on_finished:
                self.on_finished(self)

    def _run(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for record in self.containers.values():
                reason = (
                    "PodInitializing" if record.init or self._has_init() else "ContainerCreating"
                )
                record.status = self._container_status(record, _state("waiting", reason=reason))
            self._set_condition("PodReadyToStartContainers", "False")
            self._set_condition(
                "Initialized",
                "False" if self._has_init() else "True",
                "ContainersNotInitialized" if self._has_init() else None,
            )
            self._set_condition("ContainersReady", "False", "ContainersNotReady")
            self._set_condition("Ready", "False", "ContainersNotReady")
            self._publish()

        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None:
            timer = threading.Timer(float(deadline), self._deadline_exceeded)
            timer.daemon = True
            timer.start()

        builder = VolumeBuilder(
            self.rest, self.pod, self.pod_dir, self.node.host_ip, self.node.memory_dir / self.uid
        )
        volumes = self._retry_until_ready(builder.build_all, "ContainerCreating")
        if builder.tokens:
            threading.Thread(
                target=self._refresh_tokens,
                args=(builder,),
                name=f"{self.name}-tokens",
                daemon=True,
            ).start()
        if volumes is None:
            return self._finish()
        with self._lock:
            self._set_condition("PodReadyToStartContainers", "True")
            self._publish()
        env = EnvResolver(self.rest, self.pod, self.node.host_ip)

        for record in (r for r in self.containers.values() if r.init):
            if not self._run_with_restarts(record, volumes, env):
                return self._finish()
        with self._lock:
            self._set_condition("Initialized", "True")
            self._publish()

        threads = [
            threading.Thread(target=self._run_with_restarts, args=(r, volumes, env), daemon=True)
            for r in self.containers.values()
            if not r.init
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self._finish()

    def _refresh_tokens(self, builder: VolumeBuilder) -> None:
        while not self._stop_requested.wait(builder.token_lifetime()):
            try:
                builder.refresh_tokens()
            except (ApiError, OSError) as error:
                log.warning("refreshing tokens of %s/%s: %s", self.namespace, self.pod_name, error)

    def _has_init(self) -> bool:
        return any(r.init for r in self.containers.values())

    def _deadline_exceeded(self) -> None:
        seconds = self.pod["spec"].get("activeDeadlineSeconds")
        self.request_stop(
            float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)),
            (
                "DeadlineExceeded",
                f"Pod was active on the node longer than the specified deadline ({seconds}s)",
            ),
        )

    def _retry_until_ready(
        self, attempt: Callable[[], Any], reason: str, record: ContainerRecord | None = None
    ) -> Any:
        """Retry ``attempt`` while what it needs is missing, as a kubelet does."""
        delay = 0.5
        while not self._stop_requested.is_set():
            try:
                return attempt()
            except VolumeNotReady as error:
                with self._lock:
                    targets = [record] if record else list(self.containers.values())
                    for target in targets:
                        target.status["state"] = _state(
                            "waiting", reason=reason, message=str(error)
                        )
                    self._publish()
                self._stop_requested.wait(delay)
                delay = min(delay * 2, 5.0)
        return None

    def _run_with_restarts(
        self, record: ContainerRecord, volumes: dict[str, HostVolume], env: EnvResolver
    ) -> bool:
        """Run a container until it needs no restart; True when it (finally) succeeded."""
        backoff = 1.0
        while True:
            exit_code = self._run_container(record, volumes, env)
            if exit_code is None or self._stop_requested.is_set():
                return False
            again = self.restart_policy == "Always" or (
                self.restart_policy == "OnFailure" and exit_code != 0
            )
            if not again:
                return exit_code == 0
            with self._lock:
                record.status["lastState"] = record.status["state"]
                record.status["state"] = _state(
                    "waiting",
                    reason="CrashLoopBackOff",
                    message=f"back-off {backoff:.0f}s restarting failed container",
                )
                record.restart_count += 1
                record.status["restartCount"] = record.restart_count
                self._publish()
            if self._stop_requested.wait(backoff):
                return False
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF)

    def _run_container(
        self, record: ContainerRecord, volumes: dict[str, HostVolume], env_resolver: EnvResolver
    ) -> int | None:
        spec = record.spec
        environment = self._retry_until_ready(
            lambda: env_resolver.resolve(
                spec, {**self.node.base_env, **self.env_extra, "HOSTNAME": self.pod_name}
            ),
            "CreateContainerConfigError",
            record,
        )
        if environment is None:
            return None
        container_dir = self.pod_dir / "containers" / record.name
        container_dir.mkdir(parents=True, exist_ok=True)
        log_path = container_dir / f"{record.restart_count}.log"
        termination_file = container_dir / f"{record.restart_count}.termination-log"
        termination_file.write_bytes(b"")
        home = self.pod_dir / "home"
        home.mkdir(exist_ok=True)
        environment.setdefault("HOME", str(home))
        started = now()
        try:
            argv = self._sandbox_argv(spec, volumes, termination_file) + command_line(
                spec, environment
            )
        except (ValueError, KeyError) as error:
            with self._lock:
                record.status["state"] = _state(
                    "terminated",
                    exitCode=128,
                    reason="StartError",
                    message=str(error),
                    startedAt=started,
                    finishedAt=now(),
                )
                self._publish()
            return 128
        with log_path.open("ab") as log_file:
            record.log_paths.append(log_path)
            record.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # one process group to signal on deletion
            )
        with self._lock:
            record.status["state"] = _state("running", startedAt=started)
            record.status["started"] = True
            record.status["containerID"] = (
                f"kubetune://{self.uid}/{record.name}/{record.restart_count}"
            )
            if not record.init:
                self.status["phase"] = "Running"
            self._publish()

        exit_code = self._wait(record.process)
        record.status["started"] = False
        message = self._termination_message(spec, termination_file, log_path, exit_code)
        reason = "Completed" if exit_code == 0 else "Error"
        with self._lock:
            terminated: JSON = {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now(),
                "containerID": record.status["containerID"],
            }
            if message:
                terminated["message"] = message
            record.status["state"] = _state("terminated", **terminated)
            self._publish()
        return exit_code

    def _wait(self, process: subprocess.Popen[bytes]) -> int:
        while True:
            try:
                code = process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if self._stop_requested.is_set():
                code = self._terminate(process)
                break
        return 128 - code if code < 0 else code

    def _terminate(self, process: subprocess.Popen[bytes]) -> int:
        # SIGTERM goes to the container's processes but not to bwrap itself: bwrap
        # would die at once and, through --die-with-parent, SIGKILL the container
        # before it could act on SIGTERM (e.g. the trainer's checkpoint).
        _signal_group(process.pid, signal.SIGTERM, spare=process.pid)
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline:
            try:
                return process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(process.pid, signal.SIGKILL)
        return process.wait()

    def _sandbox_argv(
        self, spec: JSON, volumes: dict[str, HostVolume], termination_file: Path
    ) -> list[str]:
        argv = [
            "bwrap",
            "--die-with-parent",
            "--bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
        ]
        # --dev gives a minimal /dev; GPUs and friends are bound back in.
        for device in self.node.device_paths:
            argv += ["--dev-bind", device, device]
        for mount in spec.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ValueError(f"volumeMount {mount['name']!r} names no volume of the pod")
            source = volume.path / mount.get("subPath", "") if mount.get("subPath") else volume.path
            if mount.get("subPath"):
                source.mkdir(parents=True, exist_ok=True)
            read_only = volume.read_only or bool(mount.get("readOnly", False))
            argv += [
                "--ro-bind" if read_only else "--bind",
                str(source),
                _host_resolved(mount["mountPath"]),
            ]
        # A volume mounted over a folder that holds the host's Python (an emptyDir at /tmp while
        # the checkout lives under /tmp, say) would hide the commands the pod runs: bind those
        # folders back on top.
        mount_points = [_host_resolved(m["mountPath"]) for m in spec.get("volumeMounts", [])]
        for path in _host_software_paths():
            if any(
                path == point or path.startswith(point.rstrip("/") + "/") for point in mount_points
            ):
                argv += ["--bind", path, path]
        message_path = spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        argv += ["--bind", str(termination_file), _host_resolved(message_path)]
        argv += ["--chdir", spec.get("workingDir") or "/", "--"]
        return argv

    def _termination_message(
        self, spec: JSON, termination_file: Path, log_path: Path, exit_code: int
    ) -> str:
        try:
            with termination_file.open("rb") as handle:
                message = handle.read(MAX_TERMINATION_MESSAGE)
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

    def _finish(self) -> None:
        with self._lock:
            main = [r for r in self.containers.values() if not r.init]
            # Containers that never started (after a failed init container, or a
            # deletion first) keep their waiting state, as with a kubelet.
            succeeded = all(
                ((r.status.get("state") or {}).get("terminated") or {}).get("exitCode") == 0
                for r in main
            )
            if self._stop_reason is not None:
                self.status["reason"], self.status["message"] = self._stop_reason
                succeeded = False
            self.status["phase"] = "Succeeded" if succeeded else "Failed"
            log.info("pod %s/%s %s", self.namespace, self.pod_name, self.status["phase"])
            self._set_condition("ContainersReady", "False", "PodCompleted")
            self._set_condition("Ready", "False", "PodCompleted")
            self._set_condition("PodReadyToStartContainers", "False")
            self._publish()

    # -- status -----------------------------------------------------------------

    def _container_status(self, record: ContainerRecord, state: JSON) -> JSON:
        return {
            "name": record.name,
            "image": record.spec.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": record.restart_count,
            "started": False,
            "state": state,
        }

    def _set_condition(self, kind: str, status: str, reason: str | None = None) -> None:
        conditions: list[JSON] = self.status["conditions"]
        for condition in conditions:
            if condition["type"] == kind:
                if condition["status"] != status:
                    condition["lastTransitionTime"] = now()
                condition.update(status=status, reason=reason)
                return
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "lastProbeTime": None,
                "lastTransitionTime": now(),
            }
        )

    def _publish(self) -> None:
        """Patch the pod's status; a vanished pod stops the worker."""
        main = [r for r in self.containers.values() if not r.init]
        for record in self.containers.values():
            record.status["ready"] = (not record.init) and record.running()
        if self.status["phase"] == "Running":
            ready = all(r.running() for r in main)
            self._set_condition(
                "ContainersReady",
                "True" if ready else "False",
                None if ready else "ContainersNotReady",
            )
            self._set_condition(
                "Ready", "True" if ready else "False", None if ready else "ContainersNotReady"
            )
        status = {
            **self.status,
            "initContainerStatuses": [dict(r.status) for r in self.containers.values() if r.init],
            "containerStatuses": [dict(r.status) for r in main],
        }
        try:
            self.rest.patch(
                path_for(self.namespace, "pods", self.pod_name, "status"),
                {"metadata": {"uid": self.uid}, "status": status},
                STRATEGIC_MERGE_PATCH,
            )
        except ApiError as error:
            if error.status in (404, 409):
                self.request_stop(0)
            else:
                log.warning("status of %s/%s: %s", self.namespace, self.pod_name, error)


def _signal_group(pgid: int, sig: signal.Signals, spare: int | None = None) -> None:
    """Signal every process of group ``pgid`` (but ``spare``)."""
    if spare is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == spare:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ...
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), sig)


def _host_software_paths() -> list[str]:
    """Where the commands pods run come from: this Python's environment, its base install, and
    kubetune's source folders (an editable install points there)."""
    source_root = Path(__file__).resolve().parents[1]
    paths = {str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix)} | {str(source_root)}
    return sorted(paths)


def _host_resolved(path: str) -> str:
    """``path`` with symlinks in its existing part resolved (e.g. /var/run -> /run).

    bubblewrap creates missing mount points itself, but it does not follow a
    symlinked parent reliably; resolving first gives it a real directory.
    """
    target = Path(path)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return str(existing.resolve() / target.relative_to(existing))
