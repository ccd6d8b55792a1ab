"""Progress reporters, the termination message, and a CLI that starts without importing torch."""

from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kubetune.api.config import JobRef, ProgressSettings
from kubetune.api.contract import TERMINATION_MESSAGE_LIMIT
from kubetune.api.models import (
    CURVE_POINTS,
    CurvePoint,
    EvaluationResult,
    EvaluationSample,
    Progress,
    TrainerResult,
)
from kubetune.local.ports import free_port
from kubetune.trainer.publish.outputs import termination_message, write_termination_message
from kubetune.trainer.run.progress import (
    FileReporter,
    NoopReporter,
    OperatorReporter,
    ProgressTracker,
    RateLimitedReporter,
    progress_json,
    reporter_from_settings,
)
from kubetune_devtools.loopback import LoopbackServer

pytestmark = pytest.mark.unit

PROGRESS = Progress(
    step=30,
    total_steps=120,
    epoch=0.75,
    percent=25.0,
    loss=1.25,
    learning_rate=2e-4,
    tokens_per_second=5000.0,
    eta_seconds=90.0,
    updated_at="2026-11-28T04:00:00Z",
)


class OperatorStandIn(BaseHTTPRequestHandler):
    """Stands in for the operator's progress endpoint: answers each POST with the next of
    ``codes`` (then 202), recording the bodies and the bearer tokens it was sent."""

    codes: ClassVar[list[int]] = []
    bodies: ClassVar[list[dict[str, Any]]] = []
    tokens: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        type(self).tokens.append(self.headers.get("Authorization", ""))
        code = type(self).codes.pop(0) if type(self).codes else 202
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def operator_stand_in() -> Any:
    OperatorStandIn.codes, OperatorStandIn.bodies, OperatorStandIn.tokens = [], [], []
    server = LoopbackServer(OperatorStandIn)
    yield server
    server.close()


class Recorder:
    def __init__(self) -> None:
        self.reports: list[Progress] = []

    def report(self, progress: Progress) -> None:
        self.reports.append(progress)


def operator_reporter(server: LoopbackServer, tmp_path: Path) -> OperatorReporter:
    token = tmp_path / "token"
    token.write_text("projected-token\n")
    job = JobRef(name="llama", namespace="team-a", uid="uid-1")
    reporter = OperatorReporter(f"{server.url}/v1/progress", token, None, job)
    reporter.BACKOFF = (0.05,)
    return reporter


def test_the_operator_reporter_posts_camelcase_progress_with_the_pods_token(
    operator_stand_in: LoopbackServer, tmp_path: Path
) -> None:
    reporter = operator_reporter(operator_stand_in, tmp_path)
    reporter.report(PROGRESS)
    assert reporter.close(timeout=10)
    (body,) = OperatorStandIn.bodies
    assert OperatorStandIn.tokens == ["Bearer projected-token"]
    assert body["job"] == {"name": "llama", "namespace": "team-a", "uid": "uid-1"}
    assert body["progress"] == {
        "step": 30,
        "totalSteps": 120,
        "epoch": 0.75,
        "percent": 25.0,
        "loss": 1.25,
        "learningRate": 2e-4,
        "tokensPerSecond": 5000.0,
        "etaSeconds": 90.0,
        "updatedAt": "2026-11-28T04:00:00Z",
    }


def test_the_final_progress_is_retried_until_the_operator_takes_it(
    operator_stand_in: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A standby replica (503), then an operator that restarts (connection refused is the same
    # path), then the leader.
    OperatorStandIn.codes = [503, 503, 429]
    reporter = operator_reporter(operator_stand_in, tmp_path)
    with caplog.at_level(logging.WARNING):
        reporter.report(PROGRESS)
        assert reporter.close(timeout=10)
    assert len(OperatorStandIn.bodies) == 4
    assert "could not report progress to the operator (HTTP 503)" in caplog.text
    assert "projected-token" not in caplog.text


def test_a_report_the_operator_refuses_as_malformed_is_not_retried(
    operator_stand_in: LoopbackServer, tmp_path: Path
) -> None:
    OperatorStandIn.codes = [400]
    reporter = operator_reporter(operator_stand_in, tmp_path)
    reporter.report(PROGRESS)
    assert reporter.close(timeout=10)
    assert len(OperatorStandIn.bodies) == 1


def test_an_unreachable_operator_costs_a_warning_and_close_gives_up_in_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    reporter = OperatorReporter(f"http://127.0.0.1:{free_port()}/v1/progress", token)
    reporter.BACKOFF = (0.05,)
    with caplog.at_level(logging.WARNING):
        reporter.report(PROGRESS)
        assert not reporter.close(timeout=0.5)
    assert "training continues" in caplog.text


def test_rate_limit_passes_one_report_per_interval_and_every_forced_one() -> None:
    now = [0.0]
    recorder = Recorder()
    limited = RateLimitedReporter(recorder, interval_seconds=10, clock=lambda: now[0])
    passed = []
    for t in (0.0, 3.0, 9.9, 10.0, 15.0, 21.0):
        now[0] = t
        passed.append(limited.report(PROGRESS))
    now[0] = 21.5
    passed.append(limited.report(PROGRESS, force=True))
    assert passed == [True, False, False, True, False, True, True]
    assert len(recorder.reports) == 4


def test_file_reporter_writes_the_latest_progress_as_json(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    FileReporter(path).report(PROGRESS)
    FileReporter(path).report(PROGRESS.model_copy(update={"step": 31}))
    assert json.loads(path.read_text())["step"] == 31
    assert json.loads(path.read_text())["totalSteps"] == 120


def test_reporter_follows_the_settings(tmp_path: Path) -> None:
    job = JobRef(name="j", namespace="n")
    file_settings = ProgressSettings(reporter="file", file=str(tmp_path / "p.json"))
    assert isinstance(reporter_from_settings(file_settings, None), FileReporter)
    operator = ProgressSettings(
        reporter="operator", url="https://operator:8443/v1/progress", token_file="/t/token"
    )
    assert isinstance(reporter_from_settings(operator, job), OperatorReporter)
    assert isinstance(
        reporter_from_settings(ProgressSettings(reporter="operator"), job), NoopReporter
    )
    assert isinstance(reporter_from_settings(ProgressSettings(), job), NoopReporter)


def test_a_tracker_resumed_mid_run_reports_the_runs_loss_a_rate_and_an_eta(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    tracker = ProgressTracker(RateLimitedReporter(recorder, 0.001), tmp_path / "metrics.jsonl")
    history = [{"step": 15, "loss": 2.5, "learning_rate": 1e-4}, {"step": 15, "eval_loss": 3.0}]
    tracker.begin(step=19, total_steps=40, history=history)
    tracker.stepped(20, epoch=0.5)
    assert (recorder.reports[-1].loss, recorder.reports[-1].learning_rate) == (2.5, 1e-4)
    tracker.logged(20, epoch=0.5, logs={"loss": 2.0, "learning_rate": 1e-4, "num_tokens": 500})
    # TRL counts an attempt's tokens from zero: the first log after the restart has a rate.
    assert tracker.tokens_per_second is not None and tracker.tokens_per_second > 0
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 20 and line["tokens_per_second"] == tracker.tokens_per_second
    latest = recorder.reports[-1]
    assert latest.percent == 50.0 and latest.eta_seconds is not None


def test_a_preference_runs_progress_carries_the_reward_metrics_beside_the_loss(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    tracker = ProgressTracker(RateLimitedReporter(recorder, 0), tmp_path / "metrics.jsonl")
    # A resumed run reports the rewards it had reached until it logs new ones.
    tracker.begin(step=10, total_steps=40, history=[{"step": 10, "loss": 0.6,
                  "rewards/accuracies": 0.5, "rewards/margins": 0.1}])  # fmt: skip
    tracker.stepped(11, epoch=0.3)
    assert (recorder.reports[-1].reward_accuracy, recorder.reports[-1].reward_margin) == (0.5, 0.1)
    logs = {"loss": 0.4, "rewards/accuracies": 0.875, "rewards/margins": 0.75,
            "rewards/chosen": 0.25, "rewards/rejected": -0.5}  # fmt: skip
    tracker.logged(20, epoch=0.5, logs=logs)
    status = progress_json(recorder.reports[-1])
    assert status["loss"] == 0.4
    assert (status["rewardAccuracy"], status["rewardMargin"]) == (0.875, 0.75)
    assert (status["chosenReward"], status["rejectedReward"]) == (0.25, -0.5)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["reward_accuracy"] == 0.875 and line["chosen_reward"] == 0.25


def test_an_sft_runs_progress_has_no_reward_metrics(tmp_path: Path) -> None:
    recorder = Recorder()
    tracker = ProgressTracker(RateLimitedReporter(recorder, 0), None)
    tracker.begin(step=0, total_steps=10)
    tracker.logged(5, epoch=0.5, logs={"loss": 1.0, "mean_token_accuracy": 0.5})
    assert "rewardAccuracy" not in progress_json(recorder.reports[-1])


def test_termination_message_stays_within_4kib_and_keeps_the_adapter_digest() -> None:
    samples = [EvaluationSample(prompt="p" * 1000, base="b" * 1000, adapter="a" * 1000)] * 8
    result = TrainerResult.model_validate(
        {
            "outcome": "Succeeded",
            "reason": "Succeeded",
            "message": "m" * 6000,
            "adapter": {"uri": "s3://b/a", "sha256": "f" * 64, "sizeBytes": 10},
            "evaluation": EvaluationResult(samples=samples).model_dump(),
        }
    )
    text = termination_message(result)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert json.loads(text)["adapter"]["sha256"] == "f" * 64


def test_a_nan_metric_or_loss_stays_out_of_what_the_operator_writes_into_the_status() -> None:
    # The Kubernetes API refuses a status holding NaN; Python's json would write one.
    result = TrainerResult(
        outcome="Succeeded", reason="Succeeded", metrics={"train_loss": 1.5, "eval_loss": math.nan}
    )
    assert json.loads(termination_message(result))["metrics"] == {"train_loss": 1.5}
    progress = Progress(step=2, loss=math.inf, history=[CurvePoint(step=1, loss=math.nan)])
    assert progress_json(progress) == {"step": 2, "history": [{"step": 1}]}


def test_termination_message_goes_to_the_configured_path(termination_log: Path) -> None:
    result = TrainerResult(outcome="Failed", reason="DatasetError", message="dataset not found")
    assert write_termination_message(result) == termination_log
    assert json.loads(termination_log.read_text())["reason"] == "DatasetError"


def test_cli_help_and_config_validation_do_not_import_torch(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("kind: TrainerConfig\nspec: {}\n")
    probe = (
        "import sys\n"
        "from kubetune.trainer import cli\nfrom kubetune.trainer.run import local_run\n"
        f"code = cli.main(['--config', {str(bad)!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    env = {"KUBETUNE_TERMINATION_LOG": str(tmp_path / "t"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.strip() == "2 []", done.stderr


def test_a_traceback_that_quotes_a_secret_is_redacted() -> None:
    import io

    from kubetune.trainer.secrets import install_redaction, uninstall_redaction

    secret = "hf_TRACEBACKsecret_123456"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    guard = install_redaction([secret])
    try:
        try:
            raise RuntimeError(f"401 for https://example.invalid/?token={secret}")
        except RuntimeError:
            logging.getLogger("kubetune.trainer").exception("training failed unexpectedly")
    finally:
        uninstall_redaction(guard)
        logging.getLogger().removeHandler(handler)
    assert "RuntimeError: 401" in stream.getvalue()
    assert secret not in stream.getvalue()


def test_object_store_files_and_prefixes_are_fetched_and_uploaded_through_fsspec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    from kubetune.trainer import locations

    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/data/train.jsonl", b'{"text": "a"}\n')
    fs.pipe("/bucket/model/config.json", b"{}")
    local_file = locations.fetch_object_store("memory://bucket/data/train.jsonl", "datasets")
    assert local_file.read_text() == '{"text": "a"}\n'
    local_dir = locations.fetch_object_store("memory://bucket/model", "models")
    assert (local_dir / "config.json").read_text() == "{}"

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    locations.upload_directory(tmp_path / "adapter", "memory://bucket/out/run-1")
    assert fs.cat("/bucket/out/run-1/adapter_model.safetensors") == b"weights"


SECRET = "hf_LOGGEDbyMISTAKE_0123456789"


def test_a_secret_logged_by_mistake_is_redacted() -> None:
    import io

    from kubetune.trainer.secrets import install_redaction, uninstall_redaction

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    guard = install_redaction([SECRET])
    try:
        logging.getLogger("some.library").warning("calling the hub with token %s", SECRET)
    finally:
        uninstall_redaction(guard)
        logging.getLogger().removeHandler(handler)
    assert SECRET not in stream.getvalue()
    assert "token ***" in stream.getvalue()


def test_a_token_is_redacted_as_read_stripped_url_encoded_and_escaped() -> None:
    from kubetune.trainer.secrets import redact, secret_forms

    token = "hf_ab/cd+ef=gh_0123"
    forms = secret_forms([f"{token}\n"])
    text = (
        f"raw {token}\n stripped {token} query ?t=hf_ab%2Fcd%2Bef%3Dgh_0123 "
        "lower hf_ab%2fcd%2bef%3dgh_0123 repr 'hf_ab/cd+ef=gh_0123\\n'"
    )
    # The raw form goes first, newline and all.
    assert redact(text, forms) == "raw *** stripped *** query ?t=*** lower *** repr '***'"


def test_credentials_of_a_uri_are_secrets_and_a_result_stays_valid_without_them() -> None:
    from kubetune.api.models import TrainerResult
    from kubetune.trainer.secrets import HubTokens, redact_result

    uri = "https://user:pa55word-x@host/d.jsonl?X-Amz-Signature=abcdef123456&state=Succeeded"
    secrets = HubTokens().with_uri_credentials([uri]).secrets
    assert {"pa55word-x", "abcdef123456", "Succeeded"} <= set(secrets)
    result = TrainerResult(
        outcome="Succeeded", reason="Succeeded", message="read Succeeded from pa55word-x"
    )
    redacted = redact_result(result, secrets)
    assert (redacted.outcome, redacted.reason) == ("Succeeded", "Succeeded")
    assert redacted.message == "read *** from ***"


def test_the_curves_stay_within_their_points_evenly_spread_over_a_long_run(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    tracker = ProgressTracker(RateLimitedReporter(recorder, 0.0), None)
    tracker.begin(step=0, total_steps=50_000)
    for step in range(10, 50_001, 10):  # 5,000 logging steps
        tracker.logged(step, None, {"loss": 10_000 / step, "learning_rate": 1e-4})
    history = recorder.reports[-1].history
    assert history is not None and 100 < len(history) <= CURVE_POINTS
    steps = [point.step for point in history]
    assert steps[0] == 10, "the start of the curve is kept"
    gaps = {b - a for a, b in itertools.pairwise(steps)}
    assert len(gaps) == 1, f"the points are not evenly spread: gaps {sorted(gaps)}"
    assert steps[-1] > 50_000 - gaps.pop() - 10, "the curve reaches the latest steps"
    assert all(point.loss == round(10_000 / point.step, 6) for point in history)
    # What status carries stays small however long the run.
    assert len(json.dumps(progress_json(recorder.reports[-1]))) < 24_000


def test_a_resumed_tracker_carries_the_curve_it_had_before_the_restart(tmp_path: Path) -> None:
    def logs(step: int) -> dict[str, Any]:
        return {"loss": 5.0 - step / 100, "learning_rate": 2e-4, "num_tokens": 64 * step}

    whole = Recorder()
    uninterrupted = ProgressTracker(RateLimitedReporter(whole, 0.0), None)
    uninterrupted.begin(step=0, total_steps=400)
    for step in range(10, 401, 10):
        uninterrupted.logged(step, None, logs(step))

    again = Recorder()
    resumed = ProgressTracker(RateLimitedReporter(again, 0.0), None)
    log_history = [{"step": step, **logs(step)} for step in range(10, 201, 10)]
    resumed.begin(step=200, total_steps=400, history=log_history)
    for step in range(210, 401, 10):
        resumed.logged(step, None, logs(step))

    def curve(progress: Progress) -> list[tuple[int, float | None]]:
        return [(point.step, point.loss) for point in progress.history or []]

    assert curve(again.reports[-1]) == curve(whole.reports[-1])
    assert len(curve(whole.reports[-1])) == 40


def test_the_curves_reach_the_operator_in_camelcase(
    operator_stand_in: LoopbackServer, tmp_path: Path
) -> None:
    reporter = operator_reporter(operator_stand_in, tmp_path)
    tracker = ProgressTracker(RateLimitedReporter(reporter, 0.0), None)
    tracker.begin(step=0, total_steps=20)
    tracker.logged(10, 0.5, {"loss": 1.5, "learning_rate": 2e-4, "num_tokens": 640})
    assert reporter.close(timeout=10)
    (point,) = OperatorStandIn.bodies[-1]["progress"]["history"]
    assert point["step"] == 10 and point["loss"] == 1.5 and point["learningRate"] == 2e-4
    assert point["tokensPerSecond"] > 0
