"""The bubblewrap command line a container runs under.

Each container is a process tree in its own mount namespace, with the pod's volumes and the
termination-log file bound at their mount paths. Its root is either its image's root filesystem
(``image_sandbox_argv``: an overlay over the unpacked image, so the container writes its own layer
and never the image; read-only when the pod asks), or, for the node's host images (the explicit
fast mode, see images), the host's root (``sandbox_argv``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubetune.api.contract import TERMINATION_MESSAGE_PATH
from kubetune.local.images import Image
from kubetune.local.rest import JSON
from kubetune.local.volumes import HostVolume

# Mounts the container's overlay (image below, its own layer above) in a private mount namespace,
# then runs bwrap there: the overlay goes away with the namespace when the container exits.
_OVERLAY_THEN_EXEC = 'mount -t overlay overlay -o "$1" "$2" && shift 2 && exec "$@"'


def sandbox_argv(
    spec: JSON,
    volumes: Mapping[str, HostVolume],
    termination_file: Path,
    device_paths: Sequence[str] = (),
) -> list[str]:
    """``bwrap ... --`` for the container ``spec``; its command line follows.

    Raises ValueError when a volumeMount names no volume of the pod.
    """
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
    for device in device_paths:
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
        if any(path == point or path.startswith(point.rstrip("/") + "/") for point in mount_points):
            argv += ["--bind", path, path]
    message_path = spec.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH
    argv += ["--bind", str(termination_file), _host_resolved(message_path)]
    argv += ["--chdir", spec.get("workingDir") or "/", "--"]
    return argv


def image_sandbox_argv(
    spec: JSON,
    image: Image,
    layer_dir: Path,
    volumes: Mapping[str, HostVolume],
    termination_file: Path,
    *,
    uid: int,
    gid: int,
    working_dir: str,
    device_paths: Sequence[str] = (),
) -> list[str]:
    """The command line that runs a container of ``image``; its process's argv follows.

    ``layer_dir`` (empty, on the same file system as the pod) holds the container's writable
    layer. The process runs as ``uid``:``gid`` in a user namespace (the node's own user outside,
    as bubblewrap maps it). Raises ValueError when a volumeMount names no volume of the pod.
    """
    upper, work, merged = (layer_dir / part for part in ("upper", "work", "merged"))
    for part in (upper, work, merged):
        part.mkdir(parents=True, exist_ok=True)
    overlay = f"lowerdir={image.rootfs},upperdir={upper},workdir={work}"
    argv = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", _OVERLAY_THEN_EXEC, "overlay", overlay, str(merged),
        "bwrap", "--die-with-parent", "--unshare-user", "--uid", str(uid), "--gid", str(gid),
        "--bind", str(merged), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/dev/shm",
    ]  # fmt: skip
    for device in device_paths:
        argv += ["--dev-bind", device, device]
    if Path("/etc/resolv.conf").exists():
        argv += ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
    for mount in spec.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ValueError(f"volumeMount {mount['name']!r} names no volume of the pod")
        source = volume.path / mount["subPath"] if mount.get("subPath") else volume.path
        if mount.get("subPath"):
            source.mkdir(parents=True, exist_ok=True)
        read_only = volume.read_only or bool(mount.get("readOnly", False))
        argv += ["--ro-bind" if read_only else "--bind", str(source), mount["mountPath"]]
    message_path = spec.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH
    argv += ["--bind", str(termination_file), message_path]
    if (spec.get("securityContext") or {}).get("readOnlyRootFilesystem"):
        argv += ["--remount-ro", "/"]
    argv += ["--chdir", working_dir, "--"]
    return argv


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
