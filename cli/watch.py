"""``kubetune watch NAME``: a live view of one FineTuneJob on any cluster the kubeconfig reaches.

Phase, a progress bar with ETA, a loss sparkline, recent events; ends with the result (adapter,
sha256, final loss, base vs adapter answers) and exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from kubetune.api.models import GROUP, PLURAL, VERSION, FineTuneJobStatus

_SPARKS = "▁▂▃▄▅▆▇█"
_TERMINAL = {"Succeeded", "Failed"}

#: Terminal escape sequences: CSI (colours, cursor moves, screen clears), OSC (window titles,
#: hyperlinks, clipboard writes), DCS/SOS/PM/APC strings, and any other two-character escape.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[\s\S]?"
)


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with every terminal escape sequence and control character removed (tabs and,
    where ``newlines`` allows, line breaks kept; other line breaks become spaces): what a job's
    status says comes from its trainer, its dataset and the hosts it reads, and a watcher's
    terminal must not take it for commands (colours, a cleared screen, a forged line, a link
    that isn't what it shows, a clipboard write)."""
    text = _ESCAPES.sub("", text)
    kept = []
    for char in text:
        if char == "\n" and newlines:
            kept.append(char)
        elif char in "\n\r\t":
            kept.append(" " if char != "\t" else char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            continue  # C0/C1 controls, bidi overrides and other invisible formatting
        else:
            kept.append(char)
    return "".join(kept)


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """Loss history as a one-line chart, newest on the right: the whole curve, evenly thinned to
    ``width`` points."""
    values = list(values)
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    recent = values
    if not recent:
        return ""
    low, high = min(recent), max(recent)
    span = (high - low) or 1.0
    return "".join(_SPARKS[int((v - low) / span * (len(_SPARKS) - 1))] for v in recent)


def progress_bar(percent: float | None, width: int = 30) -> str:
    filled = round((percent or 0.0) / 100 * width)
    return "█" * filled + "░" * (width - filled)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def render_view(name: str, status: FineTuneJobStatus, losses: Sequence[float]) -> str:
    """The lines shown while a job runs (pure: the unit tests pin it)."""
    phase = status.phase or "Pending"
    lines = [printable(f"{name}: {phase}")]
    progress = status.progress
    if progress is not None and progress.total_steps:
        lines.append(
            f"  {progress_bar(progress.percent)} {progress.percent or 0:5.1f}%  "
            f"step {progress.step}/{progress.total_steps}  ETA {_duration(progress.eta_seconds)}"
        )
        details = []
        if progress.loss is not None:
            details.append(f"loss {progress.loss:.4f}")
        if progress.tokens_per_second:
            details.append(f"{progress.tokens_per_second:,.0f} tok/s")
        if progress.learning_rate is not None:
            details.append(f"lr {progress.learning_rate:.2e}")
        if details:
            lines.append("  " + "  ".join(details))
        rewards = []
        if progress.reward_accuracy is not None:
            rewards.append(f"reward accuracy {progress.reward_accuracy:.3f}")
        if progress.reward_margin is not None:
            rewards.append(f"margin {progress.reward_margin:+.3f}")
        if progress.chosen_reward is not None and progress.rejected_reward is not None:
            rewards.append(
                f"chosen {progress.chosen_reward:+.3f} / rejected {progress.rejected_reward:+.3f}"
            )
        if rewards:
            lines.append("  " + "  ".join(rewards))
        # The run's own curve (status.progress.history) from its first step, else what this
        # watch has seen.
        curve = [point.loss for point in progress.history or () if point.loss is not None]
        if len(curve) < 2:
            curve = list(losses)
        if len(curve) > 1:
            lines.append(f"  loss {sparkline(curve)}")
    estimate = status.estimate
    if estimate is not None:
        about = "about " if estimate.sampled else ""
        parts = [f"{estimate.examples:,} examples", f"{about}{estimate.tokens:,} tokens/epoch",
                 f"{estimate.steps:,} steps"]  # fmt: skip
        if estimate.peak_gib is not None:
            parts.append(f"peak {estimate.peak_gib} GiB on {printable(str(estimate.gpu_kind))}")
        if estimate.seconds is not None:
            parts.append(f"about {_duration(estimate.seconds)} of training")
        lines.append("  estimate: " + ", ".join(parts))
    for condition in status.conditions:
        said = printable(f"{condition.reason}: {condition.message}")
        if condition.status == "True" and condition.type in ("Failed", "Suspended"):
            lines.append(f"  {printable(condition.type)}: {said}")
        if condition.type == "Ready" and condition.status == "False" and phase == "Pending":
            lines.append(f"  waiting: {said}")
    return "\n".join(lines)


def render_result(status: FineTuneJobStatus) -> str:
    result = status.result
    if result is None:
        return ""
    said = printable(f"{result.outcome} ({result.reason}) {result.message}")
    lines = [f"result: {said}".rstrip()]
    if result.adapter is not None:
        adapter = result.adapter
        lines.append(f"  adapter  {printable(adapter.uri)}")
        lines.append(f"  sha256   {printable(adapter.sha256)}  ({adapter.size_bytes:,} bytes)")
    for key in sorted(result.metrics):
        lines.append(f"  {printable(key):<8} {result.metrics[key]:.4f}")
    if result.evaluation is not None and result.evaluation.samples:
        lines.append("  prompt → base | adapter")
        for sample in result.evaluation.samples:
            lines.append(f"    {sample.prompt!r} → {sample.base!r} | {sample.adapter!r}")
    return "\n".join(lines)


def _event_lines(core: Any, namespace: str, name: str, uid: str, seen: set[str]) -> list[str]:
    # By uid too: events of an earlier FineTuneJob of the same name are not this one's.
    events = core.list_namespaced_event(
        namespace,
        field_selector=(
            f"involvedObject.kind=FineTuneJob,involvedObject.name={name},involvedObject.uid={uid}"
        ),
    )
    lines = []
    for event in sorted(events.items, key=lambda e: str(e.last_timestamp or e.event_time or "")):
        key = f"{event.metadata.uid}/{event.count}"
        if key not in seen:
            seen.add(key)
            lines.append(event_line(event.type, event.reason, event.message))
    return lines


def event_line(kind: str | None, reason: str | None, message: str | None) -> str:
    """One Event, as the watch prints it."""
    return "  event " + printable(f"{kind} {reason}: {message}")


def connect(kubeconfig: str | None) -> tuple[Any, Any]:
    """The custom-objects and core clients for ``kubeconfig`` (else in-cluster, then the
    default kubeconfig); the kubernetes package is the operator extra, imported when used."""
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def job_arguments() -> argparse.ArgumentParser:
    """The arguments of a subcommand on one FineTuneJob of a cluster (``watch``, ``logs``,
    ``serve-manifest``), as a parent parser: its NAME, ``-n/--namespace`` and ``--kubeconfig``
    (read by :func:`connect`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, then ~/.kube)")
    return parser


def watch(
    name: str,
    namespace: str,
    kubeconfig: str | None,
    *,
    interval: float = 2.0,
    timeout: float | None = None,
    out: Callable[[str], None] = print,
) -> int:
    from kubernetes import client

    custom, core = connect(kubeconfig)

    def emit(text: str) -> None:  # every line, whatever built it, goes through printable
        out(printable(text, newlines=True))

    losses: list[float] = []
    seen_events: set[str] = set()
    last_view = ""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                emit(f"FineTuneJob {namespace}/{name} not found")
                return 1
            raise
        status = FineTuneJobStatus.model_validate(obj.get("status") or {})
        progress = status.progress
        new_loss = progress is not None and progress.loss is not None
        if new_loss and progress is not None and (not losses or losses[-1] != progress.loss):
            losses.append(float(progress.loss or 0.0))
        uid = str(obj.get("metadata", {}).get("uid", ""))
        for line in _event_lines(core, namespace, name, uid, seen_events):
            emit(line)
        view = render_view(name, status, losses)
        if view != last_view:
            emit(view)
            last_view = view
        if status.phase in _TERMINAL:
            summary = render_result(status)
            if summary:
                emit(summary)
            return 0 if status.phase == "Succeeded" else 1
        if deadline is not None and time.monotonic() > deadline:
            emit(f"timed out after {timeout:.0f}s; the job goes on (phase {status.phase})")
            return 2
        time.sleep(interval)


def _run(args: argparse.Namespace) -> int:
    return watch(
        args.name, args.namespace, args.kubeconfig, interval=args.interval, timeout=args.timeout
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "watch", parents=[job_arguments()], help="follow one FineTuneJob until it finishes"
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    parser.add_argument("--timeout", type=float, help="give up watching after this many seconds")
    parser.set_defaults(func=_run)
