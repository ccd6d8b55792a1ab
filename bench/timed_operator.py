"""``kubetune-operator`` with a few functions timed in place by the calling thread's CPU clock
(``time.thread_time``): calls and CPU seconds per function, by thread (the event loop or another),
written to ``$KUBETUNE_TIMED_OUT`` (JSON) every 5 s. Unlike a profiler, only the functions named
in ``TARGETS`` pay for the timing, so the rest runs as it does unmeasured: for where the CPU goes
in a side-by-side run (docs/performance.md), not for timings of the whole. An async function is
timed from its start to its end, which is its CPU only while it never waits (kopf's
``process_resource_event`` on this operator's handlers doesn't).

Run it in the operator's place: a ``kubetune-operator`` beside the bench's interpreter that
execs ``python bench/timed_operator.py``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

#: (module, function or Class.method) to time.
TARGETS: Final = (
    ("kopf._core.reactor.processing", "process_resource_event"),
    ("kubetune.operator.controller", "snapshot"),
    ("kubetune.operator.controller", "seen_mark"),
    ("kubetune.operator.controller", "slim_finetunejob"),
    ("kubetune.operator.controller", "slim"),
    ("kubetune.operator.executor", "plan_cached"),
    ("kubetune.operator.executor", "reconcile"),
    ("kubetune.operator.creation", "create_children"),
    ("kubetune.operator.render", "render_validation"),
    ("kubetune.operator.writes", "write_status"),
    ("kubetune.operator.writes", "_post"),
    ("kubetune.operator.kube", "Kube.request"),
    ("prometheus_client.exposition", "generate_latest"),
    ("json", "loads"),
)
#: name → [calls, CPU seconds, {thread kind: CPU seconds}]
_STATS: dict[str, list[Any]] = {}
_LOCK = threading.Lock()


def _add(name: str, seconds: float) -> None:
    kind = "loop" if threading.current_thread() is threading.main_thread() else "thread"
    with _LOCK:
        entry = _STATS.setdefault(name, [0, 0.0, {}])
        entry[0] += 1
        entry[1] += seconds
        entry[2][kind] = entry[2].get(kind, 0.0) + seconds


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                _add(name, time.thread_time() - start)

        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, time.thread_time() - start)

    return timed


def install() -> None:
    """Wrap each target where it is defined and wherever a module imported it by name."""
    import kubetune.operator.handlers  # noqa: F401 - imports every module the targets live in

    for module_name, attribute in TARGETS:
        module = importlib.import_module(module_name)
        if "." in attribute:
            owner, method = attribute.split(".")
            cls = getattr(module, owner)
            setattr(cls, method, _timed(attribute, getattr(cls, method)))
            continue
        original = getattr(module, attribute)
        wrapped = _timed(f"{module_name}.{attribute}", original)
        for other in list(sys.modules.values()):
            if getattr(other, attribute, None) is original:
                setattr(other, attribute, wrapped)


def _write_every(out: str, seconds: float = 5.0) -> None:
    while True:
        time.sleep(seconds)
        with _LOCK:
            data = {name: [calls, cpu, dict(kinds)] for name, (calls, cpu, kinds) in _STATS.items()}
        with open(out, "w") as file:
            json.dump(data, file)


def main() -> None:
    import kubetune.operator.main as operator_main

    out = os.environ["KUBETUNE_TIMED_OUT"]
    run = operator_main.kopf.run

    def timed_run(*args: Any, **kwargs: Any) -> Any:
        install()
        threading.Thread(target=_write_every, args=(out,), daemon=True).start()
        return run(*args, **kwargs)

    operator_main.kopf.run = timed_run
    operator_main.main()


if __name__ == "__main__":
    main()
