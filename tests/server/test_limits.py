"""What the server refuses before any Kubernetes request: bodies over the limits (413, while
they stream in), requests without a bearer token (401), no project (400), too many requests
(429); always in OpenAI's error shape. No cluster: the API server it points at doesn't exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kubetune.server.app import create_app
from kubetune.server.kube import Endpoint, Kube
from kubetune.server.settings import ServerSettings

pytestmark = pytest.mark.unit

AUTH = {"Authorization": "Bearer some-token", "OpenAI-Project": "team-a"}


def client_for(tmp_path: Path, **settings: object) -> TestClient:
    configured = ServerSettings(files_dir=tmp_path, max_file_bytes=1000, **settings)  # type: ignore[arg-type]
    nowhere = Kube(Endpoint("https://127.0.0.1:9", False), timeout=1)
    return TestClient(create_app(configured, kube=nowhere))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with client_for(tmp_path, rate_limit_per_second=0) as made:
        yield made


def test_an_upload_over_the_limit_is_refused_as_it_streams_in(client: TestClient) -> None:
    big = b'{"text": "a"}\n' * 200
    answer = client.post("/v1/files", headers=AUTH, files={"file": ("a.jsonl", big)},
                         data={"purpose": "fine-tune"})  # fmt: skip
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "too_large"
    answer = client.post("/v1/files", headers=AUTH, files={"file": ("a.jsonl", big * 30)},
                         data={"purpose": "fine-tune"})  # fmt: skip
    assert answer.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield from [b"x" * 1024] * 2048

    answer = client.post("/v1/fine_tuning/jobs", headers=AUTH, content=chunks())
    assert answer.status_code == 413


def test_no_bearer_token_is_401_and_no_project_is_400(client: TestClient) -> None:
    answer = client.get("/v1/fine_tuning/jobs", headers={"OpenAI-Project": "team-a"})
    assert answer.status_code == 401
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    answer = client.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer t"})
    assert answer.status_code == 400
    answer = client.get("/v1/fine_tuning/jobs", headers={**AUTH, "OpenAI-Project": "../etc"})
    assert answer.status_code == 400


def test_an_unreachable_api_server_is_a_502_not_a_crash(client: TestClient) -> None:
    answer = client.get("/v1/fine_tuning/jobs", headers=AUTH)
    assert answer.status_code in (502, 504)
    assert "some-token" not in answer.text


def test_a_caller_over_the_rate_limit_gets_429(tmp_path: Path) -> None:
    with client_for(tmp_path, rate_limit_per_second=1) as limited:
        codes = [limited.get("/v1/models/none", headers=AUTH).status_code for _ in range(5)]
    assert 429 in codes


def test_a_dataset_url_needs_its_signature(client: TestClient) -> None:
    answer = client.get(
        "/datasets/team-a/file-0123456789abcdef01234567.jsonl",
        params={"expires": "99999999999", "signature": "0" * 64},
    )
    assert answer.status_code == 403


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000 + b"]" * 5000, b'{"seed": ' + b"9" * 5000 + b"}", b"{not json", b"[]"],
)
def test_a_body_that_is_no_json_object_is_a_400(client: TestClient, body: bytes) -> None:
    # Nesting past Python's recursion limit was a 500 (the decoder's RecursionError).
    answer = client.post("/v1/fine_tuning/jobs", headers=AUTH, content=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "the body must be a JSON object"
