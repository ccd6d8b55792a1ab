"""A real node's cgroup subtree, ``/kubetune-<id>`` in every mounted hierarchy: the node process
joins it (``join_cgroup``), and everything it starts, pods included, ends up in it;
``remove_cgroups`` kills what is left there and removes the subtree (``RealNode.clean_up``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from kubetune.local import real_node_config as config


def _controllers() -> list[Path]:
    """The mounted cgroup hierarchies (v1 controllers, and the unified one where mounted)."""
    try:
        return sorted(p for p in config.CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def join_cgroup(ident: str, pid: int) -> None:
    """Put ``pid`` into ``/kubetune-<id>/node`` of every hierarchy (created as needed)."""
    name = config.cgroup_name(ident)
    for hierarchy in _controllers():
        node = hierarchy / name / "node"
        node.mkdir(parents=True, exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            for leaf in (hierarchy / name, node):
                for key in ("cpuset.cpus", "cpuset.mems"):
                    if not (leaf / key).read_text().strip():
                        (leaf / key).write_text((hierarchy / key).read_text())
        with contextlib.suppress(OSError):
            (node / "cgroup.procs").write_text(f"{pid}\n")


def _subtree_pids(ident: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _controllers():
        top = hierarchy / config.cgroup_name(ident)
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def remove_cgroups(ident: str, timeout: float = 30.0) -> None:
    """SIGKILL every process left in the node's cgroup subtree, then remove the subtree from
    every hierarchy (deepest first)."""
    deadline = time.monotonic() + timeout
    while pids := _subtree_pids(ident):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} outlived SIGKILL in {ident}'s cgroups")
        time.sleep(0.1)
    for hierarchy in _controllers():
        top = hierarchy / config.cgroup_name(ident)
        if not top.is_dir():
            continue
        for directory in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            _rmdir_when_empty(directory, deadline)
        _rmdir_when_empty(top, deadline)


def _rmdir_when_empty(directory: Path, deadline: float) -> None:
    # A cgroup whose last process just died can be busy for a moment.
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
