"""Live progress: a small reporter interface, its three reporters, and the rate limit they share.

The training loop calls :class:`ProgressCallback` (a transformers ``TrainerCallback``) which builds
a :class:`~kubetune.api.models.Progress` and hands it to a reporter. A reporter must never stop
training: an unreachable API server costs a warning, not the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.config import JobRef, ProgressSettings
from kubetune.api.models import CURVE_POINTS, GROUP, PLURAL, VERSION, CurvePoint, Progress
from kubetune.api.timestamps import rfc3339
from kubetune.trainer.preference import reward_metrics

log = logging.getLogger(__name__)


def progress_json(progress: Progress) -> dict[str, Any]:
    return progress.model_dump(by_alias=True, exclude_none=True, mode="json")


class ProgressReporter(Protocol):
    def report(self, progress: Progress) -> None: ...


class NoopReporter:
    """For runs nobody watches."""

    def report(self, progress: Progress) -> None:
        return None


class FileReporter:
    """Writes the latest progress as one JSON object, atomically (a reader never sees half)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def report(self, progress: Progress) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps(progress_json(progress)) + "\n", encoding="utf-8")
            partial.replace(self.path)
        except OSError as exc:
            log.warning("could not write progress to %s: %s", self.path, exc.strerror)


class KubernetesStatusReporter:
    """Merge-patches ``status.progress`` of the trainer's own FineTuneJob, and nothing else.

    The pod's service account may only ``patch`` ``finetunejobs/status`` of that one object, so
    the credentials come from the projected service-account token (in-cluster config).
    """

    def __init__(self, job: JobRef, api: Any | None = None) -> None:
        self.job = job
        self._api = api

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.CustomObjectsApi()
        return self._api

    def report(self, progress: Progress) -> None:
        body = {"status": {"progress": progress_json(progress)}}
        try:
            self._client().patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.job.namespace,
                PLURAL,
                self.job.name,
                body,
                _content_type="application/merge-patch+json",
            )
        except Exception as exc:  # any API or config failure: warn and keep training
            status = getattr(exc, "status", None)
            detail = f"HTTP {status}" if status else type(exc).__name__
            log.warning(
                "could not report progress to FineTuneJob %s/%s (%s); training continues",
                self.job.namespace,
                self.job.name,
                detail,
            )


class RateLimitedReporter:
    """Passes at most one report per ``interval_seconds`` through; a forced one always passes."""

    def __init__(
        self, inner: ProgressReporter, interval_seconds: float, clock: Any = time.monotonic
    ) -> None:
        self.inner = inner
        self.interval = interval_seconds
        self.clock = clock
        self._last: float | None = None

    def report(self, progress: Progress, force: bool = False) -> bool:
        now = self.clock()
        if not force and self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        self.inner.report(progress)
        return True


def reporter_from_settings(settings: ProgressSettings, job: JobRef | None) -> ProgressReporter:
    if settings.reporter == "file":
        return FileReporter(settings.file or "progress.json")
    if settings.reporter == "kubernetes":
        if job is None:
            log.warning(
                "progress.reporter is kubernetes but the config names no job; not reporting"
            )
            return NoopReporter()
        return KubernetesStatusReporter(job)
    return NoopReporter()


class CurveHistory:
    """At most ``limit`` points of the run's curves, spread evenly over the logging steps so far.

    Every ``stride``-th logged step becomes a point; when the points outgrow ``limit``, every
    other one goes and the stride doubles, so the kept points stay evenly spaced whatever the
    run's length, and the status that carries them stays small.
    """

    def __init__(self, limit: int = CURVE_POINTS) -> None:
        self.limit = limit
        self.stride = 1
        self.points: list[CurvePoint] = []
        self._logged = 0

    def add(self, point: CurvePoint) -> None:
        if self._logged % self.stride == 0:
            self.points.append(point)
            if len(self.points) > self.limit:
                self.points = self.points[::2]
                self.stride *= 2
        self._logged += 1


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


class ProgressTracker:
    """Turns the trainer's step and log events into Progress, metrics lines and throughput."""

    def __init__(self, reporter: RateLimitedReporter, metrics_file: Path | None) -> None:
        self.reporter = reporter
        self.metrics_file = metrics_file
        self.total_steps: int | None = None
        self.loss: float | None = None
        self.learning_rate: float | None = None
        self.tokens_per_second: float | None = None
        self._started = time.monotonic()
        self._start_step = 0
        self._last_tokens: tuple[float, float] | None = None  # (num_tokens, time)
        self.curves = CurveHistory()
        #: Preference tuning's latest reward metrics (reward_accuracy, reward_margin, ...).
        self.rewards: dict[str, float] = {}

    def begin(
        self, step: int, total_steps: int | None, history: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Start (or, after a resume, continue) at ``step``; ``history`` is the run's log so far,
        so a resumed run reports the loss it had reached until it logs a new one."""
        self._started = time.monotonic()
        self._start_step = step
        self.total_steps = total_steps
        # TRL counts the tokens of each attempt from zero: the first log has a rate too.
        self._last_tokens = (0.0, self._started)
        # The curves so far come back from the run's log (throughput isn't in it).
        self.curves = CurveHistory(self.curves.limit)
        for entry in history:
            self.rewards.update(reward_metrics(entry))
            if "loss" in entry:
                self.loss = round(float(entry["loss"]), 6)
                if "learning_rate" in entry:
                    self.learning_rate = float(entry["learning_rate"])
                self.curves.add(self._point(int(entry.get("step", 0)), None))

    def _point(self, step: int, tokens_per_second: float | None) -> CurvePoint:
        return CurvePoint(
            step=step,
            loss=self.loss,
            learning_rate=_rounded(self.learning_rate),
            tokens_per_second=_rounded(tokens_per_second),
        )

    def progress(self, step: int, epoch: float | None) -> Progress:
        percent = eta = None
        if self.total_steps:
            percent = round(100.0 * step / self.total_steps, 1)
            done = step - self._start_step
            if done > 0:
                per_step = (time.monotonic() - self._started) / done
                eta = round(per_step * (self.total_steps - step), 1)
        return Progress(
            step=step,
            total_steps=self.total_steps,
            epoch=round(epoch, 4) if epoch is not None else None,
            percent=percent,
            loss=self.loss,
            learning_rate=self.learning_rate,
            tokens_per_second=self.tokens_per_second,
            eta_seconds=eta,
            **self.rewards,
            updated_at=rfc3339(),
            history=list(self.curves.points) or None,
        )

    def logged(self, step: int, epoch: float | None, logs: dict[str, Any]) -> None:
        if "loss" in logs:
            self.loss = round(float(logs["loss"]), 6)
        if "learning_rate" in logs:
            self.learning_rate = float(logs["learning_rate"])
        if "num_tokens" in logs:
            tokens, now = float(logs["num_tokens"]), time.monotonic()
            if self._last_tokens is not None and now > self._last_tokens[1]:
                rate = (tokens - self._last_tokens[0]) / (now - self._last_tokens[1])
                self.tokens_per_second = round(rate, 1)
            self._last_tokens = (tokens, now)
        self.rewards.update(reward_metrics(logs))
        if "loss" in logs:
            self.curves.add(self._point(step, self.tokens_per_second))
        if self.metrics_file is not None and ("loss" in logs or "eval_loss" in logs):
            line: dict[str, Any] = {"step": step, "epoch": epoch}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy"):
                if key in logs:
                    line[key] = float(logs[key])
            line.update(reward_metrics(logs))
            line.update(reward_metrics(logs, prefix="eval_"))
            line["tokens_per_second"] = self.tokens_per_second
            line["time"] = rfc3339()
            with self.metrics_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        self.reporter.report(self.progress(step, epoch))

    def stepped(self, step: int, epoch: float | None) -> None:
        self.reporter.report(self.progress(step, epoch))

    def finished(self, step: int, epoch: float | None) -> None:
        self.reporter.report(self.progress(step, epoch), force=True)


def make_progress_callback(tracker: ProgressTracker) -> Any:
    """The TrainerCallback that feeds ``tracker`` (built late: transformers is a heavy import)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            tracker.begin(state.global_step, state.max_steps or None, state.log_history)
            tracker.finished(state.global_step, state.epoch)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            tracker.stepped(state.global_step, state.epoch)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
        ) -> None:
            tracker.logged(state.global_step, state.epoch, logs or {})

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            tracker.finished(state.global_step, state.epoch)

    return ProgressCallback()
