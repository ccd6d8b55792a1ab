"""Runs one pod bound to the local node as host processes, from Pending to Succeeded or Failed:
volumes, init containers, then the containers with their restart policy, the pod's deadline
and its deletion. Each container runs under bubblewrap (see sandbox); the status goes to the
apiserver as a kubelet reports it (see pod_status).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.timestamps import rfc3339
from kubetune.local.container_env import EnvResolver, command_line
from kubetune.local.image_runtime import image_container_argv, wait_for_image
from kubetune.local.images import Image, ImageStore
from kubetune.local.pod_dns import PodDns, PodNetwork
from kubetune.local.pod_status import (
    ContainerRecord,
    PodStatus,
    container_state,
    termination_message,
)
from kubetune.local.process_group import terminate_group
from kubetune.local.rest import JSON, STRATEGIC_MERGE_PATCH, ApiError, Rest, path_for
from kubetune.local.sandbox import sandbox_argv, user_helper
from kubetune.local.volumes import HostVolume, VolumeBuilder, VolumeNotReady, give_to_group

log = logging.getLogger(__name__)

MAX_RESTART_BACKOFF = 60.0


@dataclass(frozen=True)
class NodeContext:
    """What every pod on one node shares."""

    node_name: str
    host_ip: str
    pods_dir: Path
    base_env: Mapping[str, str]
    memory_dir: Path  # on a host tmpfs, for emptyDir volumes with medium Memory
    images: ImageStore
    image_env: Mapping[str, str]  # what a container of an image gets from the node (no host PATH)
    device_paths: tuple[str, ...] = ()


class PodWorker(threading.Thread):
    """Drives one pod from Pending to Succeeded/Failed, or until it is deleted."""

    def __init__(
        self,
        rest: Rest,
        node: NodeContext,
        pod: JSON,
        env_extra: Mapping[str, str] | None = None,
        on_finished: Callable[[PodWorker], None] | None = None,
        *,
        address: str | None = None,
        dns: PodDns | None = None,
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
        #: The pod's own address on the loopback network (status.podIP), its names (pod_dns).
        self.address = address or node.host_ip
        self.dns = dns
        self.network: PodNetwork | None = None
        self.status = PodStatus(node.host_ip, self.address)

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
                self.status.mark_failed("NodeAgentError", str(error))
                self._publish()
        finally:
            self.finished.set()
            if self.on_finished:
                self.on_finished(self)

    def _run(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.status.mark_pending(self.containers.values())
            self._publish()
        if self.dns is not None:
            self.network = self.dns.add(self.pod, self.address, self.pod_dir / "etc-hosts")

        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None:
            timer = threading.Timer(float(deadline), self._deadline_exceeded)
            timer.daemon = True
            timer.start()

        builder = VolumeBuilder(
            self.rest,
            self.pod,
            self.pod_dir,
            self.node.host_ip,
            self.node.memory_dir / self.uid,
            pod_ip=self.address,
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
        fs_group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        if fs_group is not None:
            for volume in volumes.values():
                give_to_group(volume, int(fs_group))
        with self._lock:
            self.status.set_condition("PodReadyToStartContainers", "True")
            self._publish()
        env = EnvResolver(self.rest, self.pod, self.node.host_ip, self.address)

        for record in (r for r in self.containers.values() if r.init):
            if not self._run_with_restarts(record, volumes, env):
                return self._finish()
        with self._lock:
            self.status.set_condition("Initialized", "True")
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
                        target.status["state"] = container_state(
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
                record.status["state"] = container_state(
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

    def _image(self, record: ContainerRecord) -> Image | bool | None:
        """The container's image from the store; True for a host image; None when stopped."""

        def waiting(reason: str, message: str) -> None:
            with self._lock:
                state = (record.status.get("state") or {}).get("waiting") or {}
                if state.get("reason") != reason:
                    record.status["state"] = container_state(
                        "waiting", reason=reason, message=message
                    )
                    self._publish()

        image = wait_for_image(self.node.images, record.spec, self._stop_requested, waiting)
        if isinstance(image, Image):
            record.status["image"] = image.reference
            record.status["imageID"] = image.image_id
        return image

    def _run_container(
        self, record: ContainerRecord, volumes: dict[str, HostVolume], env_resolver: EnvResolver
    ) -> int | None:
        spec = record.spec
        image = self._image(record)
        if image is None:
            return None
        base = (
            {**dict(image.config.env), **self.node.image_env}
            if isinstance(image, Image)
            else dict(self.node.base_env)
        )
        environment = self._retry_until_ready(
            lambda: env_resolver.resolve(
                spec,
                {
                    **base,
                    **self.env_extra,
                    "HOSTNAME": self.network.hostname if self.network else self.pod_name,
                },
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
        termination_file.chmod(0o666)  # whatever user the container runs as writes it
        layer_dir = container_dir / f"{record.restart_count}.layer"
        started = rfc3339()
        try:
            if isinstance(image, Image):
                argv = image_container_argv(
                    self.pod,
                    spec,
                    image=image,
                    layer_dir=layer_dir,
                    volumes=volumes,
                    termination_file=termination_file,
                    environment=environment,
                    helper=user_helper(self.node.pods_dir.parent / "user-helper"),
                    device_paths=self.node.device_paths,
                    network=self.network,
                )
            else:
                home = self.pod_dir / "home"
                home.mkdir(exist_ok=True)
                environment.setdefault("HOME", str(home))
                argv = sandbox_argv(
                    spec, volumes, termination_file, self.node.device_paths, self.network
                ) + command_line(spec, environment)
        except (ValueError, KeyError) as error:
            with self._lock:
                record.status["state"] = container_state(
                    "terminated",
                    exitCode=128,
                    reason="StartError",
                    message=str(error),
                    startedAt=started,
                    finishedAt=rfc3339(),
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
            record.status["state"] = container_state("running", startedAt=started)
            record.status["started"] = True
            record.status["containerID"] = (
                f"kubetune://{self.uid}/{record.name}/{record.restart_count}"
            )
            if not record.init:
                self.status.mark_running()
            self._publish()

        exit_code = self._wait(record.process)
        shutil.rmtree(layer_dir, ignore_errors=True)
        record.status["started"] = False
        message = termination_message(spec, termination_file, log_path, exit_code)
        reason = "Completed" if exit_code == 0 else "Error"
        with self._lock:
            terminated: JSON = {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": rfc3339(),
                "containerID": record.status["containerID"],
            }
            if message:
                terminated["message"] = message
            record.status["state"] = container_state("terminated", **terminated)
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
                code = terminate_group(process, self._grace)
                break
        return 128 - code if code < 0 else code

    def _finish(self) -> None:
        with self._lock:
            self.status.mark_finished(self.containers.values(), self._stop_reason)
            log.info("pod %s/%s %s", self.namespace, self.pod_name, self.status.phase)
            self._publish()

    def _publish(self) -> None:
        """Patch the pod's status; a vanished pod stops the worker."""
        try:
            self.rest.patch(
                path_for(self.namespace, "pods", self.pod_name, "status"),
                {
                    "metadata": {"uid": self.uid},
                    "status": self.status.document(self.containers.values()),
                },
                STRATEGIC_MERGE_PATCH,
            )
        except ApiError as error:
            if error.status in (404, 409):
                self.request_stop(0)
            else:
                log.warning("status of %s/%s: %s", self.namespace, self.pod_name, error)
