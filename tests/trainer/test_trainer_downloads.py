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
            if path.startswith("/moved"):
                self.send_response(302)
                self.send_header("Location", path.removeprefix("/moved"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path == "/refused":
                body = HOST_WORDS.encode()
                self.send_response(403, HOST_REASON)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
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


#: What a tenant's host says back: none of it may reach the termination message.
HOST_REASON = "Forbidden-by-internal-service-7f3a"
HOST_WORDS = "db_password=internal-secret-1c2d\nsecond line of the body"


@pytest.fixture(autouse=True)
def _loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test hosts serve on the loopback, which downloads refuse unless the settings allow it."""
    monkeypatch.setenv("KUBETUNE_DOWNLOAD_ALLOWED_CIDRS", "127.0.0.0/8,::1/128")


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
    from kubetune.trainer.dataset.formats import prepare

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
        "the server answered HTTP 404"
    )


def test_an_http_error_carries_the_status_code_and_nothing_the_host_said(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, dataset_host: DatasetHost
) -> None:
    code, _, _ = _train(tiny, tmp_path, dataset_host.url("/refused"))
    assert code == 3
    written = termination_log.read_text()
    assert json.loads(written)["message"] == (
        f"cannot download dataset http://127.0.0.1:{dataset_host.port}/refused: "
        "the server answered HTTP 403"
    )
    for said in (HOST_REASON, "internal-secret-1c2d", "second line"):
        assert said not in written


def test_a_loopback_dataset_host_is_refused_unless_the_settings_allow_it(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    dataset_host: DatasetHost,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBETUNE_DOWNLOAD_ALLOWED_CIDRS")
    uri = f"http://localhost:{dataset_host.port}/data/train.jsonl"  # a name, resolved
    code, _, output = _train(tiny, tmp_path, uri)
    assert code == 3
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "DatasetError"
    assert written["message"].startswith(f"cannot download dataset {uri}: localhost resolves to ")
    assert "an address that isn't public" in written["message"]
    assert "KUBETUNE_DOWNLOAD_ALLOWED_CIDRS" in written["message"]
    assert dataset_host.requests == []  # refused before a byte was sent
    assert not (output / "adapter_model.safetensors").exists()


def test_a_redirect_is_refused_not_followed(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, dataset_host: DatasetHost
) -> None:
    # Even to the same host: where a redirect leads is the host's choice.
    code, _, _ = _train(tiny, tmp_path, dataset_host.url("/moved/data/train.jsonl"))
    assert code == 3
    written = json.loads(termination_log.read_text())
    assert written["message"] == (
        f"cannot download dataset http://127.0.0.1:{dataset_host.port}/moved/data/train.jsonl: "
        "the server answered HTTP 302, a redirect; downloads follow none"
    )
    assert [r["path"] for r in dataset_host.requests] == ["/moved/data/train.jsonl"]


def test_a_hosts_header_line_and_column_names_stay_out_of_the_termination_message(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, dataset_host: DatasetHost
) -> None:
    # A URI that points at a service the tenant can't reach: its first line becomes a CSV
    # header, its words column names; the job's status must not carry them back.
    dataset_host.files["/leak.csv"] = f"{HOST_WORDS.splitlines()[0]}\nvalue\n".encode()
    code, logs, _ = _train(tiny, tmp_path, dataset_host.url("/leak.csv"))
    assert code == 3
    written = termination_log.read_text()
    assert json.loads(written)["message"] == (
        "cannot detect the dataset format from its columns: expected messages, "
        "prompt+completion, instruction+output, or text for method.type sft; set dataset.format and "
        "dataset.columns (the trainer's log lists the dataset's columns)"
    )
    assert "internal-secret-1c2d" not in written
    # The trainer's own log keeps the detail for whoever runs it.
    assert "internal-secret-1c2d" in logs


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254",
     "100.100.100.200", "192.0.0.192", "0.0.0.0", "::1", "fe80::1", "fd00:ec2::254",
     "fd20:ce::254", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe", "2002:0a00:0001::1"],
)  # fmt: skip
def test_addresses_that_are_not_public_are_refused(address: str) -> None:
    import ipaddress

    from kubetune.trainer.dataset.downloads import is_public

    assert not is_public(ipaddress.ip_address(address))
    assert is_public(ipaddress.ip_address("8.8.8.8"))
    assert is_public(ipaddress.ip_address("2001:4860:4860::8888"))


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
