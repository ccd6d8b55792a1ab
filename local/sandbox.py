"""The bubblewrap command line a container runs under.

Each container is a process tree in its own mount namespace, with the pod's volumes and the
termination-log file bound at their mount paths. Its root is either its image's root filesystem
(``image_sandbox_argv``: an overlay over the unpacked image, so the container writes its own layer
and never the image; read-only when the pod asks), or, for the node's host images (the explicit
fast mode, see images), the host's root (``sandbox_argv``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubetune.api.contract import TERMINATION_MESSAGE_PATH
from kubetune.local.images import Image
from kubetune.local.pod_dns import PodNetwork
from kubetune.local.rest import JSON
from kubetune.local.volumes import HostVolume

# Where the node's user-switching helper (setpriv with its own loader and libraries, so it runs
# in any image) is bound inside image containers.
HELPER_MOUNT = "/.kubetune-node"

# Mounts the container's overlay (image below, its own layer above) in a private mount namespace,
# then runs bwrap there: the overlay goes away with the namespace when the container exits.
_OVERLAY_THEN_EXEC = 'mount -t overlay overlay -o "$1" "$2" && shift 2 && exec "$@"'


def sandbox_argv(
    spec: JSON,
    volumes: Mapping[str, HostVolume],
    termination_file: Path,
    device_paths: Sequence[str] = (),
    network: PodNetwork | None = None,
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
        *_network_args(network),
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
    helper: Path,
    uid: int,
    gid: int,
    groups: Sequence[int] = (),
    working_dir: str,
    device_paths: Sequence[str] = (),
    network: PodNetwork | None = None,
) -> list[str]:
    """The command line that runs a container of ``image``; its process's argv follows.

    ``layer_dir`` (empty, on the same file system as the pod) holds the container's writable
    layer. The process runs as ``uid``:``gid`` (plus ``groups``) with no capabilities and no new
    privileges, switched to by ``helper`` (see ``user_helper``). Raises ValueError when a
    volumeMount names no volume of the pod.
    """
    upper, work, merged = (layer_dir / part for part in ("upper", "work", "merged"))
    for part in (upper, work, merged):
        part.mkdir(parents=True, exist_ok=True)
    overlay = f"lowerdir={image.rootfs},upperdir={upper},workdir={work}"
    argv = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", _OVERLAY_THEN_EXEC, "overlay", overlay, str(merged),
        "bwrap", "--die-with-parent",
        "--bind", str(merged), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/dev/shm",
        "--ro-bind", str(helper), HELPER_MOUNT,
    ]  # fmt: skip
    for device in device_paths:
        argv += ["--dev-bind", device, device]
    if Path("/etc/resolv.conf").exists():
        argv += ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
    argv += _network_args(network)
    for mount in spec.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ValueError(f"volumeMount {mount['name']!r} names no volume of the pod")
        source = volume.path / mount["subPath"] if mount.get("subPath") else volume.path
        if mount.get("subPath"):
            source.mkdir(parents=True, exist_ok=True)
        read_only = volume.read_only or bool(mount.get("readOnly", False))
        target = _resolved_in(image.rootfs, mount["mountPath"])
        argv += ["--ro-bind" if read_only else "--bind", str(source), target]
    message_path = spec.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH
    argv += ["--bind", str(termination_file), _resolved_in(image.rootfs, message_path)]
    # bubblewrap creates missing mount-point folders with the node's umask; make their parents
    # here, in the container's layer, listable by any user as a runtime does.
    targets = [argv[i + 2] for i, word in enumerate(argv) if word in ("--bind", "--ro-bind")]
    for target in targets[1:]:
        _make_parents(image.rootfs, upper, target)
    if (spec.get("securityContext") or {}).get("readOnlyRootFilesystem"):
        argv += ["--remount-ro", "/"]
    supplementary = ",".join(str(g) for g in dict.fromkeys([gid, *groups]))
    argv += ["--chdir", working_dir, "--",
             f"{HELPER_MOUNT}/lib/{_LOADER}", "--library-path", f"{HELPER_MOUNT}/lib",
             f"{HELPER_MOUNT}/setpriv", f"--reuid={uid}", f"--regid={gid}",
             f"--groups={supplementary}", "--inh-caps=-all", "--bounding-set=-all",
             "--no-new-privs", "--"]  # fmt: skip
    return argv


def _network_args(network: PodNetwork | None) -> list[str]:
    """The pod's host name (a UTS namespace of its own) and its hosts file, which the node keeps
    current: bound, not copied, so the container sees each update."""
    if network is None:
        return []
    return ["--unshare-uts", "--hostname", network.hostname,
            "--ro-bind", str(network.hosts_file), "/etc/hosts"]  # fmt: skip


def _make_parents(rootfs: Path, upper: Path, target: str) -> None:
    parts = [p for p in target.split("/") if p][:-1]
    for depth in range(1, len(parts) + 1):
        relative = "/".join(parts[:depth])
        layer, image = upper / relative, rootfs / relative
        if layer.exists():
            continue
        if image.is_symlink() or (image.exists() and not image.is_dir()):
            return
        layer.mkdir()
        if image.is_dir():
            info = image.stat()
            os.chmod(layer, info.st_mode & 0o7777)
            os.chown(layer, info.st_uid, info.st_gid)
        else:
            layer.chmod(0o755)


def _resolved_in(root: Path, path: str) -> str:
    """``path`` inside the image ``root`` with the image's symlinks resolved (e.g. /var/run ->
    /run), as bubblewrap can't create mount points through a symlinked folder."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        if part == ".":
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and hops < 40:
            hops += 1
            link = str(candidate.readlink())
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


_LOADER = "ld-linux-x86-64.so.2"
_helper_lock = threading.Lock()


def user_helper(directory: Path) -> Path:
    """The host's ``setpriv`` with its dynamic loader and libraries, copied into ``directory``
    once: run through that loader it works inside any image, whatever libc the image has."""
    with _helper_lock:
        if (directory / "setpriv").exists():
            return directory
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ValueError("setpriv not found on the node (Debian package util-linux)")
        linked = subprocess.run(["ldd", setpriv], capture_output=True, text=True, check=True)
        libraries = re.findall(r"(/\S+)", linked.stdout)
        staging = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "lib").mkdir(parents=True)
        for library in libraries:
            target = staging / "lib" / Path(library).name
            shutil.copy(Path(library).resolve(), target)
        loader = staging / "lib" / _LOADER
        if not loader.exists():
            raise ValueError(f"no {_LOADER} among setpriv's libraries: {libraries}")
        shutil.copy(setpriv, staging / "setpriv")
        staging.rename(directory)
        return directory


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
