"""Stopping a container's process tree as a kubelet does: SIGTERM, a grace period, SIGKILL.

A container runs in its own session (one process group) under bubblewrap. The group is
signalled through /proc, so that bubblewrap itself can be spared the SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def terminate_group(process: subprocess.Popen[bytes], grace_seconds: float) -> int:
    """SIGTERM the group led by ``process``, SIGKILL it after ``grace_seconds``; its exit status."""
    # SIGTERM goes to the container's processes but not to bwrap itself: bwrap
    # would die at once and, through --die-with-parent, SIGKILL the container
    # before it could act on SIGTERM (e.g. the trainer's checkpoint).
    signal_group(process.pid, signal.SIGTERM, spare=process.pid)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        try:
            return process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    signal_group(process.pid, signal.SIGKILL)
    return process.wait()


def signal_group(pgid: int, sig: signal.Signals, spare: int | None = None) -> None:
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
