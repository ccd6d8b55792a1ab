"""Containers in images on the local node: waiting for an image as a kubelet waits for a pull,
and the bubblewrap command line that runs a container in its image's root under the pod's
overrides (ENTRYPOINT/CMD, WORKDIR, USER, groups, runAsNonRoot)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from kubetune.local.container_env import expand
from kubetune.local.images import Image, ImageStore, home_of, image_argv, image_user
from kubetune.local.pod_dns import PodNetwork
from kubetune.local.rest import JSON
from kubetune.local.sandbox import image_sandbox_argv
from kubetune.local.volumes import HostVolume


def wait_for_image(
    images: ImageStore,
    container: JSON,
    stopped: threading.Event,
    waiting: Callable[[str, str], None],
) -> Image | bool | None:
    """The container's image from the store; True for an image run on the host; None when
    ``stopped``. An image that isn't present waits as a kubelet's does (it can't be pulled
    here): ``ErrImageNeverPull`` under ``imagePullPolicy: Never``, otherwise ``ErrImagePull``,
    then ``ImagePullBackOff`` (each told to ``waiting``), looking again with a growing back-off.
    """
    reference = str(container.get("image", ""))
    if images.runs_on_host(reference):
        return True
    never = container.get("imagePullPolicy") == "Never"
    delay, attempts = 1.0, 0
    while not stopped.is_set():
        image = images.find(reference)
        if image is not None:
            return image
        if never:
            reason = "ErrImageNeverPull"
            message = f'Container image "{reference}" is not present with pull policy of Never'
        else:
            reason = "ErrImagePull" if attempts == 0 else "ImagePullBackOff"
            message = (
                f'Back-off pulling image "{reference}": the local node pulls no images; '
                "build it into its image store (make images)"
            )
        attempts += 1
        waiting(reason, message)
        stopped.wait(delay)
        delay = min(delay * 2, 10.0)
    return None


def image_container_argv(
    pod: JSON,
    spec: JSON,
    *,
    image: Image,
    layer_dir: Path,
    volumes: dict[str, HostVolume],
    termination_file: Path,
    environment: dict[str, str],
    helper: Path,
    device_paths: Sequence[str],
    network: PodNetwork | None = None,
) -> list[str]:
    """bwrap in the image's root with its ENTRYPOINT/CMD/WORKDIR/USER under the pod's
    overrides; ``environment`` gets the image user's HOME. ValueError: can't be started."""
    security = pod["spec"].get("securityContext") or {}
    uid, gid = image_user(spec, security, image)
    groups = [int(g) for g in security.get("supplementalGroups", [])]
    if security.get("fsGroup") is not None:
        groups.append(int(security["fsGroup"]))
    non_root = (spec.get("securityContext") or {}).get("runAsNonRoot", security.get("runAsNonRoot"))
    if non_root and uid == 0:
        raise ValueError("container has runAsNonRoot and image will run as root")
    process = [expand(part, environment) for part in image_argv(spec, image.config)]
    if not process:
        raise ValueError(f"no command specified: image {image.reference} has no ENTRYPOINT")
    environment.setdefault("HOME", home_of(uid, image.rootfs))
    working_dir = spec.get("workingDir") or image.config.working_dir or "/"
    return (
        image_sandbox_argv(
            spec,
            image,
            layer_dir,
            volumes,
            termination_file,
            helper=helper,
            uid=uid,
            gid=gid,
            groups=groups,
            working_dir=working_dir,
            device_paths=device_paths,
            network=network,
        )
        + process
    )
