"""The console's HTML primitives, rendered on the server with no I/O: ``Html`` (the only way
markup gets in: every value from a tenant — names, URIs, messages, answers, log lines — goes
through ``esc``), ``tag`` and ``join``; numbers, durations and ages as text; the SVG sparkline
and curves and the progress bar. The job's own fragments are console_job_html.py's."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubetune.api.timestamps import parse_rfc3339

#: Phases after which nothing changes (the pages stop polling).
FINAL_PHASES = frozenset({"Succeeded", "Failed"})
PHASES = ("Pending", "Validating", "Queued", "Running", "Suspended", "Succeeded", "Failed")


class Html(str):
    """Markup made here, safe to put in a page as it is."""

    __slots__ = ()


def esc(value: Any) -> Html:
    """``value`` as text in a page: markup already made here stays, anything else is escaped
    (quotes too: it may land in an attribute)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def tag(template: str, **values: Any) -> Html:
    """``template`` (trusted, written here) with each ``{name}`` replaced by its escaped value."""
    return Html(template.format(**{key: esc(value) for key, value in values.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(esc(part) for part in parts))


# --- numbers people read ----------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def age(text: str | None, now: datetime | None = None) -> str:
    moment = parse_time(text)
    if moment is None:
        return "—"
    return duration(((now or datetime.now(UTC)) - moment).total_seconds())


# --- charts -----------------------------------------------------------------------------------


def _points(values: Sequence[tuple[float, float]], width: float, height: float, pad: float) -> str:
    xs = [x for x, _ in values]
    ys = [y for _, y in values]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xspan = (x1 - x0) or 1.0
    yspan = (y1 - y0) or 1.0
    return " ".join(
        f"{pad + (x - x0) / xspan * (width - 2 * pad):.1f},"
        f"{height - pad - (y - y0) / yspan * (height - 2 * pad):.1f}"
        for x, y in values
    )


def curve_values(history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of one curve of ``status.progress.history``, points without it skipped."""
    found = []
    for point in history:
        value, step = point.get(key), point.get("step")
        if not isinstance(value, int | float) or not isinstance(step, int | float):
            continue
        if math.isfinite(value):
            found.append((float(step), float(value)))
    return found


def sparkline(values: Sequence[tuple[float, float]], label: str) -> Html:
    """A small inline SVG of a curve (the jobs list's loss column)."""
    if len(values) < 2:
        return Html('<span class="muted">—</span>')
    return tag(
        '<svg class="spark" viewBox="0 0 120 28" width="120" height="28" role="img" '
        'aria-label="{label}"><polyline fill="none" stroke="currentColor" stroke-width="1.5" '
        'points="{points}"/></svg>',
        label=label,
        points=_points(values, 120, 28, 2),
    )


def chart(values: Sequence[tuple[float, float]], title: str, ident: str) -> Html:
    """A curve with its axes' ranges, as inline SVG (the job page's loss and learning rate)."""
    if not values:
        return tag(
            '<figure class="chart" id="{ident}"><figcaption>{title}</figcaption>'
            '<p class="muted">no points yet</p></figure>',
            ident=ident,
            title=title,
        )
    width, height, pad = 560, 200, 28
    ys = [y for _, y in values]
    last_step, last_value = values[-1]
    circles = Html("")
    if len(values) == 1:
        circles = tag(
            '<circle r="3" fill="currentColor" cx="{x}" cy="{y}"/>',
            x=width / 2,
            y=height / 2,
        )
    return tag(
        '<figure class="chart" id="{ident}" data-points="{count}">'
        "<figcaption>{title}: {last} at step {step}</figcaption>"
        '<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{aria}">'
        '<rect x="0" y="0" width="{w}" height="{h}" fill="none" class="frame"/>'
        '<text x="4" y="14" class="axis">{top}</text>'
        '<text x="4" y="{bottom_y}" class="axis">{bottom}</text>'
        '<text x="{right_x}" y="{bottom_y}" class="axis" text-anchor="end">step {step}</text>'
        '<polyline fill="none" stroke="currentColor" stroke-width="2" points="{points}"/>'
        "{circles}</svg></figure>",
        ident=ident,
        count=len(values),
        title=title,
        last=number(last_value),
        step=int(last_step),
        w=width,
        h=height,
        aria=f"{title} over {len(values)} logged steps, from {number(ys[0])} to "
        f"{number(last_value)}",
        top=number(max(ys)),
        bottom=number(min(ys)),
        bottom_y=height - 6,
        right_x=width - 4,
        points=_points(values, width, height, pad) if len(values) > 1 else "",
        circles=circles,
    )


def progress_bar(percent: float | None, label: str) -> Html:
    value = max(0.0, min(100.0, float(percent or 0.0)))
    return tag(
        '<progress max="100" value="{value}" aria-label="{label}">{value}%</progress> '
        '<span class="pct">{shown}</span>',
        value=f"{value:.1f}",
        label=label,
        shown=f"{value:.0f}%" if percent is not None else "—",
    )


# --- pieces of a job --------------------------------------------------------------------------


__all__ = [
    "FINAL_PHASES", "PHASES", "Html", "chart", "esc", "join", "progress_bar", "sparkline", "tag",
]  # fmt: skip
