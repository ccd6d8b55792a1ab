"""Where a sampled process's CPU went, from py-spy's raw (collapsed) stacks
(``side_by_side.py --py-spy FILE``): samples by package of the innermost frame (self time), by
thread, and inclusive time of each kubetune function and of a few kopf entry points, each as
milliseconds per job when ``--jobs`` and ``--rate`` (py-spy's samples a second) are given. With
``--pstats``, a cProfile of bench/profile_operator.py instead (``KUBETUNE_PROFILE_CLOCK=cpu``:
each thread's CPU): own time by package and by function, cumulative time and calls per job of
the operator's functions and kopf's.

    .venv/bin/python bench/profile_summary.py FILE --jobs 600 --rate 50 [--top 25]
    .venv/bin/python bench/profile_summary.py PROFILE --pstats --jobs 600
"""

from __future__ import annotations

import argparse
import pstats
import re
from collections import Counter
from pathlib import Path
from typing import Final

#: A frame as py-spy writes it: ``function (path:line)``.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r"site-packages/(?P<pkg>[A-Za-z0-9_]+)")
_STDLIB = re.compile(r"/lib/python3\.\d+/(?P<mod>[A-Za-z0-9_]+)")


#: The project's packages (py-spy names a frame's file relative to its ``sys.path`` entry:
#: ``operator/executor.py``).
_OURS: Final = ("operator", "api", "trainer", "server", "local", "cli")


def package(path: str) -> str:
    """``kopf``, ``aiohttp``, ``json``, ... or ``kubetune.operator`` for the project's own."""
    if path == "~":
        return "builtins"  # cProfile's name for functions written in C
    if (found := _SITE.search(path)) is not None:
        return found["pkg"]
    if (found := _STDLIB.search(path)) is not None:
        path = path[found.start("mod") :]
    top = path.split("/", 1)[0]
    if top in _OURS and "/" in path:
        return "kubetune." + top
    return top.removesuffix(".py") or "?"


def parse(text: str) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(thread, frames outermost first as (function, path), samples) per collapsed line."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = next((p for p in parts if p.startswith("thread ")), "?")
        frames = []
        for part in parts:
            found = _FRAME.match(part)
            if found is not None and not part.startswith(("process ", "thread ")):
                frames.append((found["func"], found["path"]))
        stacks.append((thread, frames, int(count)))
    return stacks


def thread_kind(frames: list[tuple[str, str]]) -> str:
    """The loop (kopf, aiohttp, our handlers), a reconcile worker, an Event poster, other."""
    names = {f.rsplit(".", 1)[-1] for f, _ in frames}
    if "_run_once" in names:
        return "event loop"
    if "_post" in names and any("writes.py" in p for _, p in frames):
        return "event threads"
    if "_create_child" in names:
        return "creation threads"
    if "reconcile" in names and any("executor.py" in p for _, p in frames):
        return "reconcile threads"
    return "other threads"


#: Calls that wait (a thread blocked on its queue, the selector): still under way when the
#: profile is written, their time is another thread's clock (bench/profile_operator.py stops
#: every thread's profiler from one thread), never CPU.
_WAITS: Final = ("of '_queue.SimpleQueue' objects", "of 'select.poll' objects",
                 "of 'select.epoll' objects", "of '_thread.lock' objects")  # fmt: skip


def summarize_pstats(path: Path, jobs: int, top: int) -> None:
    """Own (CPU) time by package and by function; cumulative time and calls of the operator's
    and kopf's functions, each per job."""
    stats = {
        key: value
        for key, value in pstats.Stats(str(path)).stats.items()  # type: ignore[attr-defined]
        if not any(wait in key[2] for wait in _WAITS)
    }
    total = sum(tt for _, _, tt, _, _ in stats.values())
    print(f"{total:.2f} s own time in all, {jobs} jobs: {total * 1000 / jobs:.2f} ms/job")
    by_package: Counter[str] = Counter()
    own: Counter[str] = Counter()
    rows = []
    for (filename, line, func), (_, calls, tt, ct, _) in stats.items():
        pkg = package(_short(filename))
        by_package[pkg] += tt
        own[f"{func} ({pkg}:{line})"] += tt
        if pkg.startswith("kubetune") or pkg == "kopf":
            rows.append((ct, calls, f"{pkg}.{func}:{line}"))
    print("\nown time by package")
    for name, tt in by_package.most_common(top):
        print(f"  {100 * tt / total:5.1f}%  {tt * 1000 / jobs:6.2f} ms/job  {name}")
    print("\nown time by function")
    for name, tt in own.most_common(top):
        print(f"  {100 * tt / total:5.1f}%  {tt * 1000 / jobs:6.2f} ms/job  {name}")
    print("\ncumulative, kubetune and kopf (calls per job)")
    for ct, calls, name in sorted(rows, reverse=True)[: top * 2]:
        print(f"  {ct * 1000 / jobs:6.2f} ms/job  {calls / jobs:6.2f} calls/job  {name}")


def _short(filename: str) -> str:
    """A cProfile file name as py-spy would write it: from the package folder on."""
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1] if marker != "site-packages/" else filename
    for top in _OURS:
        if f"/{top}/" in filename:
            return top + "/" + filename.split(f"/{top}/", 1)[1]
    return filename


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--pstats", action="store_true", help="RAW is a cProfile's stats")
    parser.add_argument("--jobs", type=int, help="jobs handled while sampling: ms per job")
    parser.add_argument("--rate", type=float, default=50.0, help="py-spy's samples a second")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.pstats:
        summarize_pstats(args.raw, args.jobs or 1, args.top)
        return
    stacks = parse(args.raw.read_text())
    total = sum(c for _, _, c in stacks)
    per_job = 1000.0 / args.rate / args.jobs if args.jobs else None

    def show(title: str, counts: Counter[str], top: int) -> None:
        print(f"\n{title}")
        for name, count in counts.most_common(top):
            share = 100.0 * count / total
            extra = f"  {count * per_job:6.2f} ms/job" if per_job else ""
            print(f"  {share:5.1f}%  {count:7d}{extra}  {name}")

    by_package: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    for _, frames, count in stacks:
        if not frames:
            continue
        func, path = frames[-1]
        by_package[package(path)] += count
        by_leaf[f"{func} ({package(path)})"] += count
        by_thread[thread_kind(frames)] += count
        seen = set()
        for func, path in frames:
            pkg = package(path)
            if pkg.startswith("kubetune") or pkg in ("kopf", "kubernetes", "urllib3", "aiohttp"):
                name = f"{pkg}.{func}"
                if name not in seen:  # recursion counted once
                    seen.add(name)
                    inclusive[name] += count
    seconds = total / args.rate
    print(f"{total} samples ({seconds:.1f} CPU-s at {args.rate:g}/s)", end="")
    print(f", {args.jobs} jobs: {seconds * 1000 / args.jobs:.2f} ms/job" if args.jobs else "")
    show("by thread", by_thread, 10)
    show("self time by package (innermost frame)", by_package, args.top)
    show("self time by function", by_leaf, args.top)
    show("inclusive time (kubetune, kopf, kubernetes, urllib3, aiohttp)", inclusive, args.top * 2)


if __name__ == "__main__":
    main()
