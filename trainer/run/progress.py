"""Live progress: a small reporter interface, its three reporters, and the rate limit they share.

The training loop calls :class:`ProgressCallback` (a transformers ``TrainerCallback``) which builds
a :class:`~kubetune.api.models.Progress` and hands it to a reporter. A reporter must never stop
training: an unreachable operator costs a warning, not the run.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.config import JobRef, ProgressSettings
from kubetune.api.documents import finite_only
from kubetune.api.models import CURVE_POINTS, CurvePoint, Progress
from kubetune.api.timestamps import rfc3339
from kubetune.trainer.run.preference import reward_metrics

log = logging.getLogger(__name__)


def progress_json(progress: Progress) -> dict[str, Any]:
    """The report's body: JSON the operator can write into the status (no NaN or infinity)."""
    dumped: dict[str, Any] = finite_only(
        progress.model_dump(by_alias=True, exclude_none=True, mode="json")
    )
    return dumped


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


class OperatorReporter:
    """Sends progress to the operator's endpoint (HTTPS ``POST``) with the pod's projected token.

    The pod has no Kubernetes API identity: its token is of kubetune's own audience, bound to
    the pod, and says to the operator (through a TokenReview) which pod, hence which
    FineTuneJob, is reporting. ``report`` never blocks training: the newest progress waits in a
    one-slot buffer, and a background thread sends it, retrying with backoff while the operator
    is away (restarting, or a standby replica answering 503); a newer report replaces an unsent
    one. ``close`` waits a while for the last one, so the final progress isn't lost.
    """

    #: Seconds between retries of one report (then the last, until it is sent or replaced).
    BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)

    def __init__(
        self,
        url: str,
        token_file: str | Path,
        ca_bundle: str | None = None,
        job: JobRef | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.token_file = Path(token_file)
        self.job = job
        self.timeout = timeout
        # The operator's CA, from the config, and nothing else; without one, the system's.
        self._context = (
            ssl.create_default_context(cadata=ca_bundle)
            if ca_bundle
            else ssl.create_default_context()
        )
        self._latest: dict[str, Any] | None = None
        self._sending = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._failing = False

    def report(self, progress: Progress) -> None:
        with self._cond:
            self._latest = progress_json(progress)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="progress-reporter", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> bool:
        """Wait up to ``timeout`` seconds for the newest report to be sent; whether it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest is not None or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "the last progress report could not be sent to the operator in %gs",
                        timeout,
                    )
                    return False
                self._cond.wait(min(left, 1.0))
            self._closed = True
            self._cond.notify_all()
        return True

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while self._latest is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                body = self._latest
                self._latest = None
                self._sending = True
            assert body is not None
            sent, retry = self._send(body)
            with self._cond:
                self._sending = False
                if not sent and retry and self._latest is None:
                    self._latest = body  # retry it unless a newer one came meanwhile
                self._cond.notify_all()
            if sent or not retry:
                failures = 0
                continue
            time.sleep(self.BACKOFF[min(failures, len(self.BACKOFF) - 1)])
            failures += 1

    def _send(self, progress: dict[str, Any]) -> tuple[bool, bool]:
        """(sent, worth retrying)."""
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return self._failed(f"cannot read the progress token ({exc.strerror})", retry=True)
        payload: dict[str, Any] = {"progress": progress}
        if self.job is not None:
            payload["job"] = self.job.model_dump(by_alias=True, exclude_none=True)
        request = urllib.request.Request(  # noqa: S310 -- the operator's https URL, from config
            self.url,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(  # noqa: S310 -- see above
                request, timeout=self.timeout, context=self._context
            ) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            # 503: a standby replica, or the API can't review the token now; 429: too often;
            # 401/403 after a token rotation or a takeover race: all worth another try. A body
            # the operator refuses (400, 413) would be refused again.
            retry = exc.code not in (400, 413)
            return self._failed(f"HTTP {exc.code}", retry=retry)
        except (OSError, ValueError) as exc:
            return self._failed(type(exc).__name__, retry=True)
        if self._failing:
            log.info("progress reaches the operator again")
            self._failing = False
        return True, False

    def _failed(self, detail: str, *, retry: bool) -> tuple[bool, bool]:
        if not self._failing:
            log.warning(
                "could not report progress to the operator (%s); training continues%s",
                detail,
                ", retrying" if retry else "",
            )
            self._failing = True
        return False, retry


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

    def close(self, timeout: float = 60.0) -> None:
        """Let the inner reporter send what it still holds (the final progress)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close(timeout)


def reporter_from_settings(settings: ProgressSettings, job: JobRef | None) -> ProgressReporter:
    if settings.reporter == "file":
        return FileReporter(settings.file or "progress.json")
    if settings.reporter == "operator":
        if not settings.url or not settings.token_file:
            log.warning("progress.reporter is operator but the config names no url or token_file")
            return NoopReporter()
        return OperatorReporter(settings.url, settings.token_file, settings.ca_bundle, job)
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
