"""spec.tracking against a real MLflow tracking server (``mlflow server``, basic auth on): the
run's parameters, metrics per logging step and the adapter's tags land there, TensorBoard event
files land beside the adapter, and the MLflow password shows nowhere the run writes."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TinyAssets, assert_hidden, job_manifest, train_job

from kubetune.trainer.publish.digests import sha256_file
from kubetune_devtools.loopback import LoopbackServer

pytestmark = pytest.mark.trainer

STEPS = 20
LOGGING_STEPS = 5


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kubetune_devtools.mlflow_server import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def _scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's TFRecord event file, read with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    found: dict[str, list[tuple[int, float]]] = {}
    data = event_file.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        record = data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def as_the_pod(monkeypatch: pytest.MonkeyPatch, mlflow: Any) -> None:
    """The credentials in the environment, as the pod gets them from Secret references; nothing
    else of MLflow's or TensorBoard's from the host."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow.password)
    # `kubetune train` lets a shell's credentials reach only that shell's own tracking server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.url)
    for variable in ("MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(variable, raising=False)


def test_tracked_run_lands_params_metrics_and_adapter_tags_in_mlflow(
    tiny: TinyAssets,
    mlflow: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    termination_log: Path,
) -> None:
    as_the_pod(monkeypatch, mlflow)
    output = tmp_path / "adapter"
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        output,
        training={"maxSteps": STEPS, "loggingSteps": LOGGING_STEPS, "checkpointSteps": 10},
    )
    manifest["metadata"]["name"] = "tracked-tiny"
    manifest["spec"]["tracking"] = {
        "mlflow": {"trackingUri": mlflow.url, "experimentName": "kubetune-tests"},
        "tensorboard": {"enabled": True},
    }

    code, logs = train_job(tmp_path / "job.yaml", manifest)

    assert code == 0, logs[-3000:]
    result = json.loads((output / "result.json").read_text())
    client = mlflow.client()
    experiment = client.get_experiment_by_name("kubetune-tests")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked-tiny"
    assert run.info.status == "FINISHED"
    # Parameters: the Trainer's arguments (through transformers' MLflowCallback) and the spec's.
    params = run.data.params
    assert float(params["learning_rate"]) == pytest.approx(5.0e-3)
    assert params["max_steps"] == str(STEPS)
    assert params["kubetune.lora.r"] == "16"
    assert params["kubetune.quantization"] == "nf4"
    # Metrics at every logging step (and the first), the loss falling.
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = sorted({m.step for m in history})
    assert steps == [1, *range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS)]
    by_step = {m.step: m.value for m in history}
    assert by_step[STEPS] < by_step[1]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "learning_rate")} >= {
        LOGGING_STEPS
    }
    # The published adapter, as tags on the same run.
    tags = run.data.tags
    weights = output / "adapter_model.safetensors"
    assert tags["kubetune.adapter.sha256"] == sha256_file(weights) == result["adapter"]["sha256"]
    assert tags["kubetune.adapter.uri"] == result["adapter"]["uri"] == str(output)
    assert tags["kubetune.base_model.uri"] == str(tiny.model)
    assert tags["kubetune.dataset.fingerprint"] == result["datasetFingerprint"]
    assert tags["kubetune.outcome"] == "Succeeded"
    # The run, from the result (the operator copies it into status.result).
    expected = {"mlflowExperimentId": experiment.experiment_id, "mlflowRunId": run.info.run_id}
    assert result["tracking"] == expected
    assert json.loads(termination_log.read_text())["tracking"] == expected
    # TensorBoard: event files beside the adapter, with the loss at the logged steps.
    event_files = list((output / "runs").rglob("events.out.tfevents.*"))
    assert event_files, sorted(p.name for p in output.iterdir())
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in event_files:
        for tag, points in _scalars(event_file).items():
            scalars.setdefault(tag, []).extend(points)
    assert {step for step, _ in scalars["train/loss"]} == set(steps)
    # The password reached the server (basic auth let the run in) and nothing the run wrote.
    written = "".join(
        p.read_text(errors="replace")
        for p in output.rglob("*")
        if p.is_file() and p.suffix in {".json", ".jsonl", ".md", ".txt", ""}
    )
    assert_hidden([mlflow.password], logs=logs, output_files=written)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == mlflow.password


def test_a_run_that_fails_after_its_mlflow_run_started_names_that_run(
    tiny: TinyAssets,
    mlflow: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    termination_log: Path,
) -> None:
    as_the_pod(monkeypatch, mlflow)
    data = tmp_path / "wrong-columns.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(8))
    )
    manifest = job_manifest(tiny.model, data, tmp_path / "adapter", training={"maxSteps": 2})
    manifest["metadata"]["name"] = "tracked-bad-data"
    manifest["spec"]["tracking"] = {
        "mlflow": {"trackingUri": mlflow.url, "experimentName": "kubetune-failing"}
    }

    code, logs = train_job(tmp_path / "job.yaml", manifest)

    assert code == 3, logs[-2000:]  # DatasetError: the data is read after the run started
    reported = json.loads(termination_log.read_text())
    assert reported["reason"] == "DatasetError"
    client = mlflow.client()
    experiment = client.get_experiment_by_name("kubetune-failing")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert reported["tracking"] == {
        "mlflowExperimentId": experiment.experiment_id,
        "mlflowRunId": run.info.run_id,
    }


def two_steps_tracked_at(
    tiny: TinyAssets, output: Path, port: int, experiment: str
) -> dict[str, Any]:
    """A two-step job of the tiny model whose MLflow tracking server is at ``port`` on this
    machine."""
    manifest = job_manifest(
        tiny.model, tiny.datasets["prompt-completion"], output, training={"maxSteps": 2}
    )
    manifest["spec"]["tracking"] = {
        "mlflow": {"trackingUri": f"http://127.0.0.1:{port}", "experimentName": experiment}
    }
    return manifest


def test_unreachable_tracking_server_fails_before_the_model_loads(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manifest = two_steps_tracked_at(tiny, tmp_path / "adapter", port, "nowhere")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    code, logs = train_job(tmp_path / "job.yaml", manifest)
    assert code == 1, logs[-2000:]
    assert f"MLflow tracking server http://127.0.0.1:{port}" in logs
    assert "tracking.mlflow.trackingUri" in logs
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "tracking" not in json.loads(termination_log.read_text())  # no run was started


@pytest.mark.parametrize(
    "body",
    ["db_password=internal-secret-1c2d\nsecond line",
     json.dumps({"error_code": "PERMISSION_DENIED", "message": "db_password=internal-secret-1c2d"})],
    ids=["text", "mlflow-json"],
)  # fmt: skip
def test_what_a_tracking_server_answers_stays_out_of_the_termination_message(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
) -> None:
    from http.server import BaseHTTPRequestHandler

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = body.encode()
            self.send_response(403, "internal-reason-9e8d")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = LoopbackServer(Refusing)
    port = server.port
    manifest = two_steps_tracked_at(tiny, tmp_path / "adapter", port, "refused")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        code, logs = train_job(tmp_path / "job.yaml", manifest)
    finally:
        server.close()
    assert code == 1, logs[-2000:]
    written = termination_log.read_text()
    message = json.loads(written)["message"]
    assert message.startswith(
        f"MLflow tracking server http://127.0.0.1:{port} (tracking.mlflow.trackingUri): "
        "the server answered "
    )
    assert "HTTP 403" in message
    for said in ("internal-secret-1c2d", "internal-reason-9e8d", "second line", "PERMISSION"):
        assert said not in written, said
