"""The console's fragments of a FineTuneJob, pure functions of the job, its Events and the
caller's namespaces: the jobs table's rows, the job page's live part (phase, progress and
preference metrics, curves, estimate vs actual, answers, adapter, the conditions and Events
timeline) and its YAML with URIs shown without credentials. Markup only through console_html's
``tag``."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import yaml

from kubetune.api.uris import display_uri
from kubetune.server.console_html import (
    FINAL_PHASES,
    Html,
    age,
    chart,
    curve_values,
    duration,
    esc,
    join,
    number,
    parse_time,
    progress_bar,
    sparkline,
    tag,
)


def _status(job: Mapping[str, Any]) -> Mapping[str, Any]:
    return job.get("status") or {}


def phase_of(job: Mapping[str, Any]) -> str:
    return str(_status(job).get("phase") or "Pending")


def phase_badge(phase: str) -> Html:
    return tag('<span class="phase phase-{css}">{phase}</span>', css=phase.lower(), phase=phase)


def estimate_summary(estimate: Mapping[str, Any] | None) -> Html:
    if not estimate:
        return Html('<span class="muted">—</span>')
    parts = []
    if estimate.get("gpuKind"):
        parts.append(str(estimate["gpuKind"]))
    if isinstance(estimate.get("peakGiB"), int | float):
        parts.append(f"{estimate['peakGiB']:.1f} GiB")
    if isinstance(estimate.get("seconds"), int | float):
        parts.append(duration(estimate["seconds"]))
    if not parts and isinstance(estimate.get("steps"), int):
        parts.append(f"{estimate['steps']} steps")
    return esc(" · ".join(parts) or "—")


def job_href(job: Mapping[str, Any]) -> str:
    meta = job["metadata"]
    return f"/ui/jobs/{meta['namespace']}/{meta['name']}"


def job_row(job: Mapping[str, Any], now: datetime | None = None) -> Html:
    meta = job["metadata"]
    spec = job.get("spec") or {}
    status = _status(job)
    progress = status.get("progress") or {}
    phase = phase_of(job)
    losses = curve_values(progress.get("history") or [], "loss")
    eta = progress.get("etaSeconds") if phase == "Running" else None
    queue = (spec.get("scheduling") or {}).get("queueName")
    return tag(
        '<tr data-job="{ns}/{name}" data-phase="{phase_raw}">'
        '<td><a href="{href}">{name}</a></td><td>{ns}</td><td>{phase}</td>'
        '<td class="progress">{bar}</td><td class="loss">{spark} <span class="num">{loss}</span>'
        "</td><td>{eta}</td><td>{estimate}</td><td>{queue}</td><td>{age}</td></tr>",
        ns=meta.get("namespace", ""),
        name=meta.get("name", ""),
        phase_raw=phase,
        href=job_href(job),
        phase=phase_badge(phase),
        bar=progress_bar(progress.get("percent"), f"progress of {meta.get('name', '')}"),
        spark=sparkline(losses, f"loss of {meta.get('name', '')}"),
        loss=number(progress.get("loss")),
        eta=duration(eta) if eta is not None else "—",
        estimate=estimate_summary(status.get("estimate")),
        queue=queue or "—",
        age=age(meta.get("creationTimestamp"), now),
    )


def jobs_rows(jobs: Sequence[Mapping[str, Any]], now: datetime | None = None) -> Html:
    if not jobs:
        return Html('<tr class="empty"><td colspan="9">No FineTuneJobs match.</td></tr>')
    return join(job_row(job, now) for job in jobs)


def timeline(job: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Html:
    """Conditions and Events, oldest first, as one ordered list."""
    # (when, to the microsecond where an Event says it, what): Events of one second in order.
    entries: list[tuple[str, str, Html]] = []
    meta = job["metadata"]
    entries.append(
        (
            str(meta.get("creationTimestamp") or ""),
            "",
            tag("<strong>Created</strong> <span>{name}</span>", name=meta.get("name", "")),
        )
    )
    for cond in _status(job).get("conditions") or []:
        entries.append(
            (
                str(cond.get("lastTransitionTime") or ""),
                "",
                tag(
                    '<strong>{type}={status}</strong> <span class="reason">{reason}</span> '
                    '<span class="message">{message}</span>',
                    **_fields(cond, "type", "status", "reason", "message"),
                ),
            )
        )
    for event in events:
        when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
        count = event.get("count") or 1
        entries.append(
            (
                str(when or ""),
                str(event.get("eventTime") or ""),
                tag(
                    '<strong>Event {reason}</strong> <span class="kind-{kind}">{type}</span> '
                    '<span class="message">{message}</span>{times}',
                    reason=event.get("reason", ""),
                    kind=str(event.get("type", "Normal")).lower(),
                    type=event.get("type", "Normal"),
                    message=event.get("message", ""),
                    times=Html("") if count == 1 else tag(" <span>(×{n})</span>", n=count),
                ),
            )
        )
    entries.sort(key=lambda entry: entry[:2])
    return join(
        tag("<li><time>{when}</time> {what}</li>", when=when or "—", what=what)
        for when, _, what in entries
    )


def estimate_vs_actual(job: Mapping[str, Any]) -> Html:
    status = _status(job)
    estimate = status.get("estimate") or {}
    result = status.get("result") or {}
    progress = status.get("progress") or {}
    plan = result.get("plan") or {}
    started, finished = (
        parse_time(status.get("startTime")),
        parse_time(status.get("completionTime")),
    )
    took = (finished - started).total_seconds() if started and finished else None
    rows = [
        ("Steps", number(estimate.get("steps")), number(progress.get("step"))),
        ("Tokens per epoch", number(estimate.get("tokens")), "—"),
        (
            "Training time",
            duration(estimate.get("seconds")) if "seconds" in estimate else "—",
            duration(took) if took is not None else "—",
        ),
        (
            "Peak GPU memory",
            f"{estimate['peakGiB']:.2f} GiB" if isinstance(estimate.get("peakGiB"), float) else "—",
            f"{plan['peakGib']:.2f} GiB" if isinstance(plan.get("peakGib"), float) else "—",
        ),
        ("GPU", estimate.get("gpuKind") or "—", "—"),
    ]
    return join(
        tag(
            "<tr><th scope='row'>{what}</th><td>{est}</td><td>{act}</td></tr>", what=w, est=e, act=a
        )
        for w, e, a in rows
    )


def _fields(source: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """``names`` of ``source`` for a template (missing ones empty)."""
    return {name: source.get(name, "") for name in names}


def answers(job: Mapping[str, Any]) -> Html:
    evaluation = (_status(job).get("result") or {}).get("evaluation") or {}
    samples = evaluation.get("samples") or []
    if not samples:
        return Html('<p class="muted">No evaluation answers yet (they come when the job ends).</p>')
    rows = join(
        tag(
            "<tr><td><pre>{prompt}</pre></td><td><pre>{base}</pre></td>"
            "<td><pre>{adapter}</pre></td></tr>",
            **_fields(sample, "prompt", "base", "adapter"),
        )
        for sample in samples
    )
    metrics = evaluation.get("metrics") or {}
    metric_text = join(
        (tag("<li>{k}: {v}</li>", k=k, v=number(v)) for k, v in sorted(metrics.items())),
    )
    return tag(
        '<table class="answers"><thead><tr><th scope="col">Prompt</th><th scope="col">Base model'
        '</th><th scope="col">With the adapter</th></tr></thead><tbody>{rows}</tbody></table>'
        "<ul>{metrics}</ul>",
        rows=rows,
        metrics=metric_text,
    )


def adapter(job: Mapping[str, Any]) -> Html:
    ref = (_status(job).get("result") or {}).get("adapter")
    if not ref:
        return Html('<p class="muted">No adapter yet.</p>')
    return tag(
        '<dl class="adapter"><dt>Location</dt><dd><code id="adapter-uri">{uri}</code></dd>'
        '<dt>sha256</dt><dd><code id="adapter-sha256">{sha}</code></dd>'
        "<dt>Size</dt><dd>{size} bytes</dd></dl>",
        uri=ref.get("uri", ""),
        sha=ref.get("sha256", ""),
        size=number(ref.get("sizeBytes")),
    )


def preference_line(progress: Mapping[str, Any]) -> Html:
    """Preference tuning's latest rewards (dpo, kto), where the trainer reports them."""
    names = (("rewardAccuracy", "reward accuracy"), ("rewardMargin", "reward margin"),
             ("chosenReward", "chosen reward"), ("rejectedReward", "rejected reward"))  # fmt: skip
    shown = [f"{label} {number(progress[key])}" for key, label in names if key in progress]
    if not shown:
        return Html("")
    return tag('<p id="preference">{text}</p>', text=" · ".join(shown))


def job_live(job: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Html:
    """The part of the job page that follows the job (the page polls it until the job ends)."""
    status = _status(job)
    progress = status.get("progress") or {}
    history = progress.get("history") or []
    phase = phase_of(job)
    failure = ""
    result = status.get("result") or {}
    if phase == "Failed":
        failure = f"{result.get('reason') or ''}: {result.get('message') or ''}".strip(": ")
    return tag(
        '<div id="live" data-final="{final}" data-phase="{phase_raw}">'
        '<section aria-labelledby="h-progress"><h2 id="h-progress">Progress</h2>'
        '<p>Phase <span id="phase">{phase}</span> {bar} step <span id="step">{step}</span>'
        ' of {total} · loss <span id="loss">{loss}</span> · ETA {eta} · {tps} tokens/s</p>'
        "{preference}"
        '<p class="failure" id="failure">{failure}</p>'
        '<div class="charts">{loss_chart}{lr_chart}</div></section>'
        '<section aria-labelledby="h-estimate"><h2 id="h-estimate">Estimate vs actual</h2>'
        '<table id="estimate"><thead><tr><th scope="col"></th><th scope="col">Estimate</th>'
        '<th scope="col">Actual</th></tr></thead><tbody>{estimate}</tbody></table></section>'
        '<section aria-labelledby="h-answers" id="answers"><h2 id="h-answers">Evaluation: base vs'
        " adapter</h2>{answers}</section>"
        '<section aria-labelledby="h-adapter"><h2 id="h-adapter">Adapter</h2>{adapter}</section>'
        '<section aria-labelledby="h-timeline"><h2 id="h-timeline">Timeline</h2>'
        '<ol class="timeline" id="timeline">{timeline}</ol></section></div>',
        final="true" if phase in FINAL_PHASES else "false",
        phase_raw=phase,
        phase=phase_badge(phase),
        bar=progress_bar(progress.get("percent"), "progress"),
        step=progress.get("step", 0),
        total=progress.get("totalSteps") or "—",
        loss=number(progress.get("loss")),
        eta=duration(progress.get("etaSeconds")) if phase == "Running" else "—",
        tps=number(progress.get("tokensPerSecond"), 3),
        failure=failure,
        preference=preference_line(progress),
        loss_chart=chart(curve_values(history, "loss"), "Training loss", "loss-chart"),
        lr_chart=chart(curve_values(history, "learningRate"), "Learning rate", "lr-chart"),
        estimate=estimate_vs_actual(job),
        answers=answers(job),
        adapter=adapter(job),
        timeline=timeline(job, events),
    )


#: Spec fields that may hold a URI with credentials in it (a signed URL's query string, a
#: user:password@): the page shows them as ``display_uri`` does, as status and Events do.
URI_FIELDS = (("model", "uri"), ("dataset", "uri"), ("output", "uri"))


def job_yaml(job: Mapping[str, Any]) -> str:
    """The object as ``kubectl get -o yaml`` shows it, less managedFields, its URIs without
    credentials."""
    shown = copy.deepcopy(dict(job))
    shown.get("metadata", {}).pop("managedFields", None)
    spec = shown.get("spec") or {}
    for section, key in URI_FIELDS:
        part = spec.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            part[key] = display_uri(part[key])
    return yaml.safe_dump(shown, sort_keys=False, allow_unicode=True)


__all__ = ["job_live", "job_row", "job_yaml", "jobs_rows"]
