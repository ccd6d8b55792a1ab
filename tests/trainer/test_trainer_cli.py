"""`kubetune train` as a person runs it on a laptop: the command's flags stand in for the
manifest's cluster-only fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import TinyAssets, job_manifest, write_manifest

from kubetune.trainer.run.local_run import main as kubetune
from kubetune_devtools.loopback import LoopbackServer

pytestmark = pytest.mark.trainer


def test_train_with_output_flag_needs_no_spec_output(tiny: TinyAssets, tmp_path: Path) -> None:
    manifest = job_manifest(
        tiny.model, tiny.datasets["prompt-completion"], "unused", training={"maxSteps": 2}
    )
    del manifest["spec"]["output"]
    path = write_manifest(tmp_path / "job.yaml", manifest)

    assert kubetune(["train", str(path), "--no-progress", "--output", str(tmp_path / "here")]) == 0
    result = json.loads((tmp_path / "here" / "result.json").read_text())
    assert result["outcome"] == "Succeeded"
    assert (tmp_path / "here" / "adapter_model.safetensors").is_file()


def test_train_without_spec_output_or_flag_names_the_missing_field(
    tiny: TinyAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = job_manifest(tiny.model, tiny.datasets["prompt-completion"], "unused")
    del manifest["spec"]["output"]
    path = write_manifest(tmp_path / "job.yaml", manifest)

    assert kubetune(["train", str(path), "--no-progress"]) == 2
    assert "spec.output: required field is missing" in capsys.readouterr().err


def test_trust_remote_code_and_push_to_hub_need_their_flags(
    tiny: TinyAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest from elsewhere is input: it may not run its model's code on this machine, or
    push with this machine's hub login, unless the person running it says so."""
    manifest = job_manifest(tiny.model, tiny.datasets["prompt-completion"], tmp_path / "out")
    manifest["spec"]["model"]["trustRemoteCode"] = True
    manifest["spec"]["output"]["pushToHub"] = {
        "repoId": "someone/elsewhere", "tokenSecretRef": {"name": "hub"}
    }  # fmt: skip
    path = write_manifest(tmp_path / "job.yaml", manifest)

    assert kubetune(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "spec.model.trustRemoteCode: runs code shipped with the model on this machine; " \
        "pass --trust-remote-code to allow it" in err  # fmt: skip
    assert "spec.output.pushToHub: pushes with this machine's hub credentials; pass --push" in err
    assert not (tmp_path / "out").exists()

    assert kubetune(["train", str(path), "--no-progress", "--trust-remote-code"]) == 2
    err = capsys.readouterr().err
    assert "trustRemoteCode" not in err and "spec.output.pushToHub" in err


class RecordingTrackingServer(LoopbackServer):
    """An http server on loopback that answers every request 503 and records its headers."""

    def __init__(self) -> None:
        import http.server

        self.headers: list[dict[str, str]] = []
        recorder = self.headers

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                recorder.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _refuse

            def log_message(self, *_: object) -> None:
                return

        super().__init__(Handler)


SHELL_PASSWORD = "shell-mlflow-password-0123456789"


@pytest.mark.parametrize("shell_tracks_there", [False, True], ids=["elsewhere", "same-server"])
def test_the_shells_mlflow_credentials_go_only_to_the_shells_own_tracking_server(
    tiny: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell_tracks_there: bool
) -> None:
    server = RecordingTrackingServer()
    try:
        manifest = job_manifest(tiny.model, tiny.datasets["prompt-completion"], tmp_path / "out")
        manifest["spec"]["tracking"] = {
            "mlflow": {"trackingUri": server.url, "experimentName": "theirs"}
        }
        path = write_manifest(tmp_path / "job.yaml", manifest)
        shell_uri = server.url if shell_tracks_there else "https://mlflow.mine.example"
        for key, value in {
            "MLFLOW_TRACKING_URI": shell_uri,
            "MLFLOW_TRACKING_USERNAME": "me",
            "MLFLOW_TRACKING_PASSWORD": SHELL_PASSWORD,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        }.items():
            monkeypatch.setenv(key, value)

        # The server refuses everything: the run fails before the model loads, either way.
        assert kubetune(["train", str(path), "--no-progress"]) == 1
    finally:
        server.close()
    assert server.headers, "the manifest's tracking server was never asked"
    sent = [h.get("authorization") for h in server.headers if h.get("authorization")]
    if shell_tracks_there:
        assert sent, "the shell's own server got no credentials"
    else:
        assert sent == []
        assert SHELL_PASSWORD not in json.dumps(server.headers)
