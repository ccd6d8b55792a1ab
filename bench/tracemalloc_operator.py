"""``kubetune-operator`` under tracemalloc, for finding where its memory goes (docs/performance.md),
never for timings: tracing slows every allocation. Run it in the operator's place with
``KUBETUNE_TRACEMALLOC_DIR=DIR``; each SIGUSR1 writes, after a garbage collection, into DIR:

* ``snapshot-N.tracemalloc``: a ``tracemalloc.Snapshot`` (``KUBETUNE_TRACEMALLOC_FRAMES``
  frames a trace, 12 by default; 0 traces nothing, for the figures below alone), to compare
  offline (``--compare A B``, below);
* with ``KUBETUNE_TRACEMALLOC_PEAK=MIB``, also ``snapshot-peak.tracemalloc``: the traces at the
  highest point seen (checked every second, once MIB over the start);
* ``stats-N.txt``: the process's RSS, what tracemalloc traces now and at its peak, the Python
  allocator's arenas (``sys._debugmallocstats``), and the RSS again after ``malloc_trim(0)`` (how
  much the C allocator held free but had not given back).

    KUBETUNE_TRACEMALLOC_DIR=/tmp/mem .venv/bin/python bench/tracemalloc_operator.py
    .venv/bin/python bench/tracemalloc_operator.py --compare DIR/snapshot-1.tracemalloc \\
        DIR/snapshot-2.tracemalloc [--per N] [--top 25] [--by traceback|lineno|filename|holder]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Final

_COUNT = [0]
_LOCK = threading.Lock()


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _mallocstats() -> str:
    """``sys._debugmallocstats()`` writes to the C stderr: catch it in a file."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        try:
            os.dup2(caught.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        return caught.read().decode(errors="replace")


def _dump(out: Path) -> None:
    with _LOCK:
        _COUNT[0] += 1
        n = _COUNT[0]
        gc.collect()
        rss = _rss_kb()
        current, peak = tracemalloc.get_traced_memory()
        arenas = _mallocstats()  # the Python allocator's arenas (not while tracing)
        trimmed = None
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            trimmed = _rss_kb()
        except OSError:
            pass
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(str(out / f"snapshot-{n}.tracemalloc"))
        lines = [
            f"rss_kb {rss}",
            f"traced_kb {current // 1024}",
            f"traced_peak_kb {peak // 1024}",
            f"rss_kb_after_malloc_trim {trimmed}",
            f"threads {threading.active_count()}",
            f"gc_objects {len(gc.get_objects())}",
            "",
            arenas,
        ]
        (out / f"stats-{n}.txt").write_text("\n".join(lines))


def _watch_peak(out: Path) -> None:
    """Every second: when what is traced has grown a tenth past the last peak snapshot (and by
    ``KUBETUNE_TRACEMALLOC_PEAK`` MiB over the start), a snapshot of it as ``snapshot-peak``:
    what a burst holds at its height, which a snapshot after it no longer shows."""
    floor = (
        tracemalloc.get_traced_memory()[0] + int(os.environ["KUBETUNE_TRACEMALLOC_PEAK"]) * 2**20
    )
    dumped = 0
    while True:
        time.sleep(1)
        current = tracemalloc.get_traced_memory()[0]
        if current > floor and current > dumped * 1.1:
            with _LOCK:
                tracemalloc.take_snapshot().dump(str(out / "snapshot-peak.tracemalloc"))
                (out / "peak.txt").write_text(f"traced_kb {current // 1024}\nrss_kb {_rss_kb()}\n")
            dumped = current


#: ``--by holder``: who keeps a trace, by the first rule a frame of its traceback matches (a
#: string parsed by the JSON decoder counts as a parsed body whoever holds it).
HOLDERS: Final = (
    ("kopf: per-object memory (ResourceMemory)", ("kopf/_core/reactor/inventory.py",)),
    ("index entries, resync marks (controller.py)", ("operator/controller.py",)),
    ("kopf: index stores and reverse maps", ("kopf/_core/engines/indexing.py",)),
    ("status written, plans", ("operator/status.py", "operator/writes.py", "operator/planner.py")),
    ("metrics per job", ("operator/metrics.py",)),
    ("keys, queue (handlers.py, workqueue.py)", ("operator/handlers.py", "operator/workqueue.py")),
    ("TLS/HTTP connections", ("sslproto.py", "aiohttp", "urllib3", "ssl.py")),
    ("kopf: loggers, invocation, progression", ("kopf/",)),
)
PARSED = "parsed watch/list bodies still referenced"


def holder(traceback: tracemalloc.Traceback) -> str:
    if traceback[-1].filename.endswith("json/decoder.py"):
        return PARSED
    files = [frame.filename for frame in traceback]
    for name, marks in HOLDERS:
        if any(mark in f for mark in marks for f in files):
            return name
    return "other"


def compare(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="tracemalloc_operator.py --compare")
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--per", type=int, default=1, help="divide the growth by this (jobs)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--by", default="traceback", choices=("traceback", "lineno", "filename", "holder")
    )
    parser.add_argument("--frames", type=int, default=6, help="frames shown per traceback")
    args = parser.parse_args(argv)
    before = tracemalloc.Snapshot.load(str(args.before))
    after = tracemalloc.Snapshot.load(str(args.after))
    noise = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(noise), after.filter_traces(noise)
    diff = after.compare_to(before, "traceback" if args.by == "holder" else args.by)
    total = sum(d.size_diff for d in diff)
    print(f"growth {total / 1024:.0f} KiB, {total / args.per:.0f} B per job (/{args.per})")
    if args.by == "holder":
        held: dict[str, int] = {}
        for stat in diff:
            name = holder(stat.traceback)
            held[name] = held.get(name, 0) + stat.size_diff
        for name, size in sorted(held.items(), key=lambda kv: -kv[1]):
            print(f"{size / args.per:8.0f} B/job  {name}")
        return
    for stat in diff[: args.top]:
        print(
            f"\n{stat.size_diff / 1024:+9.0f} KiB {stat.size_diff / args.per:+8.0f} B/job "
            f"{stat.count_diff:+8d} blocks"
        )
        if args.by == "traceback":
            for line in stat.traceback.format(limit=args.frames, most_recent_first=True):
                print("    " + line)
        else:
            print(f"    {stat.traceback}")


def main() -> None:
    out = Path(os.environ["KUBETUNE_TRACEMALLOC_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    frames = int(os.environ.get("KUBETUNE_TRACEMALLOC_FRAMES", "12"))
    if frames > 0:  # 0: no tracing, only the RSS and the allocators' figures
        tracemalloc.start(frames)

    def on_signal(_signum: int, _frame: Any) -> None:
        # Not in the signal handler itself (which interrupts whatever the main thread runs).
        threading.Thread(target=_dump, args=(out,), daemon=True).start()

    signal.signal(signal.SIGUSR1, on_signal)
    if frames > 0 and os.environ.get("KUBETUNE_TRACEMALLOC_PEAK"):
        threading.Thread(target=_watch_peak, args=(out,), daemon=True).start()
    from kubetune.operator.main import main as operator_main

    operator_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare(sys.argv[2:])
    else:
        main()
