"""``kubetune-operator`` under cProfile, every thread (the event loop and the reconcile workers):
run it in the operator's place with ``KUBETUNE_PROFILE_OUT=FILE``; on SIGTERM it writes the
merged profile there (``python -m pstats FILE``). For finding where the operator's CPU goes
(docs/performance.md), never for timings: profiling slows what it measures. With
``KUBETUNE_PROFILE_CLOCK=cpu`` each thread is timed by its own CPU clock (``time.thread_time``):
a thread waiting on a socket, a lock or the selector adds nothing, so the times are CPU, not
wall; the call counts are the same either way (the watch events and the passes per job).

    KUBETUNE_PROFILE_OUT=/tmp/operator.prof .venv/bin/python bench/profile_operator.py
"""

from __future__ import annotations

import cProfile
import os
import pstats
import signal
import sys
import threading
import time
from typing import Any

_PROFILES: list[cProfile.Profile] = []
_LOCK = threading.Lock()


def _profile() -> cProfile.Profile:
    if os.environ.get("KUBETUNE_PROFILE_CLOCK") == "cpu":
        return cProfile.Profile(time.thread_time)
    return cProfile.Profile()


def _start_in_thread(_frame: Any, _event: str, _arg: Any) -> None:
    """Runs once in each new thread: gives it a profiler of its own (which replaces this)."""
    profile = _profile()
    with _LOCK:
        _PROFILES.append(profile)
    profile.enable()


def _dump(out: str) -> None:
    with _LOCK:
        profiles = list(_PROFILES)
    for profile in profiles:
        profile.disable()
    merged = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        merged.add(profile)
    merged.dump_stats(out)


def main() -> None:
    out = os.environ["KUBETUNE_PROFILE_OUT"]
    threading.setprofile(_start_in_thread)
    main_profile = _profile()
    _PROFILES.append(main_profile)

    def stop(_signum: int, _frame: Any) -> None:
        _dump(out)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    from kubetune.operator.main import main as operator_main

    main_profile.enable()
    operator_main()
    _dump(out)


if __name__ == "__main__":
    sys.exit(main())
