"""Datasets fetched over http(s): what is sent to the dataset's host (never the hub token),
what is shown of its URI (never its credentials), and how a download fails (a DatasetError,
exit 3, never a retried traceback), against a real HTTP server on the loopback."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import FAKE_TOKEN, TinyAssets, assert_hidden, job_manifest, train_job

pytestmark = pytest.mark.trainer


@dataclass
class DatasetHost:
    """An HTTP server on 127.0.0.1 that serves files and records every request it gets."""

    port: int
    files: dict[str, bytes]
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str, credentials: str = "", query: str = "") -> str:
        userinfo = f"{credentials}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")


@pytest.fixture
def dataset_host(tiny: TinyAssets) -> Iterator[DatasetHost]:
    toy = tiny.datasets["prompt-completion"].read_bytes()
    host = DatasetHost(port=0, files={"/data/train.jsonl": toy})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            host.requests.append({"path": path, "query": query, "headers": dict(self.headers)})
            body = host.files.get(path.removeprefix("/no-length"))
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            if not path.startswith("/no-length"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        server.shutdown()
        server.server_close()


def _train(
    tiny: TinyAssets, tmp_path: Path, dataset_uri: str, **training: Any
) -> tuple[int, str, Path]:
    output = tmp_path / "out"
    manifest = job_manifest(tiny.model, dataset_uri, output, training={"maxSteps": 2, **training})
    code, logs = train_job(tmp_path / "job.yaml", manifest)
    return code, logs, output


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(cache))
    return cache


def test_a_dataset_host_gets_no_hub_token_and_no_authorization(
    tiny: TinyAssets,
    tmp_path: Path,
    dataset_host: DatasetHost,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_PUSH_TOKEN", FAKE_TOKEN + "_push")
    code, logs, output = _train(tiny, tmp_path, dataset_host.url("/data/train.jsonl"))
    assert code == 0, logs[-3000:]
    assert (output / "adapter_model.safetensors").is_file()
    assert [r["path"] for r in dataset_host.requests] == ["/data/train.jsonl"]
    sent = dataset_host.requests[0]
    assert not {name.lower() for name in sent["headers"]} & {"authorization", "cookie"}
    assert FAKE_TOKEN not in json.dumps(sent)


def test_credentials_in_a_dataset_uri_reach_its_host_and_nothing_that_is_shown(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    dataset_host: DatasetHost,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kubetune.api.models import DatasetSpec
    from kubetune.trainer.data import prepare

    password, signature = "pa55w0rd-0f-alice", "5ec2e7519a7ea0fd33b0c1d2e3f4a5b6"
    credential = "AKIAEXAMPLEKEY99/20260101/us-east-1/s3/aws4_request"
    query = f"X-Amz-Credential={credential.replace('/', '%2F')}&X-Amz-Signature={signature}"
    uri = dataset_host.url("/data/train.jsonl", f"alice:{password}", query)
    code, logs, output = _train(tiny, tmp_path, uri)
    printed = capsys.readouterr()
    assert code == 0, logs[-3000:]

    # The host got what a presigned URL and userinfo are for: the query and Basic auth.
    sent = dataset_host.requests[0]
    assert sent["query"] == query
    assert sent["headers"]["Authorization"] == (
        "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
    )
    # What is shown names the dataset without them.
    card = (output / "README.md").read_text()
    assert f"`http://127.0.0.1:{dataset_host.port}/data/train.jsonl`" in card
    result = (output / "result.json").read_text()
    shown = {
        "logs": logs,
        "stdout": printed.out,
        "stderr": printed.err,
        "result": result,
        "termination_message": termination_log.read_text(),
        "model_card": card,
        "metrics": (output / "metrics.jsonl").read_text(),
    }
    assert_hidden([password, signature, credential, "AKIAEXAMPLEKEY99"], **shown)
    # The same file behind another signature (or none) is the same dataset.
    plain = prepare(DatasetSpec(uri=dataset_host.url("/data/train.jsonl")), None, seed=0)
    assert json.loads(result)["datasetFingerprint"] == plain.fingerprint


def _refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_dataset_host_is_a_dataset_error_without_its_credentials(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    port = _refused_port()
    uri = f"http://bob:hunter2-secret@127.0.0.1:{port}/train.jsonl?sig=abcdef0123456789"
    code, logs, _ = _train(tiny, tmp_path, uri)
    assert code == 3
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "DatasetError"
    assert written["message"] == (
        f"cannot download dataset http://127.0.0.1:{port}/train.jsonl: "
        f"cannot reach 127.0.0.1:{port}: Connection refused"
    )
    for secret in ("hunter2-secret", "abcdef0123456789"):
        assert secret not in logs and secret not in termination_log.read_text()


def test_an_http_error_is_a_dataset_error_naming_the_status(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, dataset_host: DatasetHost
) -> None:
    code, _, _ = _train(tiny, tmp_path, dataset_host.url("/data/missing.jsonl", query="x=1"))
    assert code == 3
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "DatasetError"
    assert written["message"] == (
        f"cannot download dataset http://127.0.0.1:{dataset_host.port}/data/missing.jsonl: "
        "the server answered HTTP 404 Not Found"
    )


@pytest.mark.parametrize("path", ["/data/train.jsonl", "/no-length/data/train.jsonl"])
def test_a_download_over_the_size_limit_stops_and_is_a_dataset_error(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    dataset_host: DatasetHost,
    monkeypatch: pytest.MonkeyPatch,
    _own_cache: Path,
    path: str,
) -> None:
    # With and without a Content-Length: a host may not say how much it will send.
    monkeypatch.setenv("KUBETUNE_MAX_DOWNLOAD_BYTES", "1000")
    code, _, _ = _train(tiny, tmp_path, dataset_host.url(path))
    assert code == 3
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "DatasetError"
    limit = "more than the download limit of 1000 bytes (KUBETUNE_MAX_DOWNLOAD_BYTES)"
    assert limit in written["message"]
    downloaded = [p for p in (_own_cache / "datasets-src").rglob("*") if p.is_file()]
    assert downloaded == []  # nothing half-written is left to be mistaken for the dataset
