"""Hub tokens, in every form they arrive in, are used stripped and shown nowhere: not in a log
line, a traceback, result.json, the termination message, metrics.jsonl or the model card, even
where a path, a URI or a library's exception quotes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from trainer_helpers import TinyAssets, assert_hidden, captured_logs, job_manifest, train_job

pytestmark = pytest.mark.trainer

#: Characters that URL-encoding changes, so its form differs from the raw one.
READ_TOKEN = "hf_READ/t0ken+with=odd&chars_1234"
PUSH_TOKEN = "hf_PUSH/t0ken+secret=value_5678"


def test_tokens_are_used_stripped_and_no_form_of_them_reaches_logs_results_or_files(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub

    used: list[str | None] = []

    class RefusingHub:
        """A hub that refuses the upload and, as real clients do, quotes the URL it called."""

        def __init__(self, token: str | None = None) -> None:
            used.append(token)
            self.token = token or ""

        def create_repo(self, repo_id: str, **_: Any) -> None:
            return None

        def upload_folder(self, **_: Any) -> None:
            raise RuntimeError(
                f"401 Client Error for url https://hub.invalid/api?token={quote(self.token)} "
                f"(token {self.token!r} is not allowed to write)"
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", RefusingHub)
    # Secrets made with `echo` end in a newline; a copy-paste brings spaces.
    monkeypatch.setenv("HF_TOKEN", f"  {READ_TOKEN}\n")
    monkeypatch.setenv("HF_PUSH_TOKEN", f"{PUSH_TOKEN}\n")
    # The dataset's folder is named with the read token, URL-encoded: the model card names the
    # dataset, and must not name the token.
    data = tmp_path / quote(READ_TOKEN, safe="") / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(tiny.datasets["prompt-completion"], data)
    output = tmp_path / "out"
    manifest = job_manifest(tiny.model, data, output, training={"maxSteps": 2})
    manifest["spec"]["output"]["pushToHub"] = {
        "repoId": "my-org/tiny-reverse",
        "tokenSecretRef": {"name": "hub-write"},
    }

    code, logs = train_job(tmp_path / "job.yaml", manifest, "--push")

    printed = capsys.readouterr()
    # The push failed after the adapter was saved: exit 1, the adapter kept.
    assert code == 1, logs[-3000:]
    assert used == [PUSH_TOKEN]  # stripped before use: the hub would refuse "...\n"
    result = (output / "result.json").read_text()
    card = (output / "README.md").read_text()
    termination = termination_log.read_text()
    assert "push to hub failed (RuntimeError: 401 Client Error" in json.loads(result)["message"]
    assert "token=***" in json.loads(termination)["message"]
    assert "***" in card  # the dataset's path, with the token cut out of it
    assert "Traceback" in logs and "token=***" in logs
    assert_hidden(
        [READ_TOKEN, PUSH_TOKEN],
        logs=logs,
        stdout=printed.out,
        stderr=printed.err,
        result=result,
        termination_message=termination,
        model_card=card,
        metrics=(output / "metrics.jsonl").read_text(),
    )


@pytest.mark.parametrize("source", ["HF_TOKEN", "tokenFile"])
def test_a_token_quoted_in_a_failure_is_cut_from_the_message_and_the_logs(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    from kubetune.api.config import TrainerConfig
    from kubetune.api.manifest import load_finetunejob
    from kubetune.trainer.cli import main as trainer

    # A model path that happens to hold the token: the failure names the path.
    model = tmp_path / READ_TOKEN / "model"
    manifest = job_manifest(model, tiny.datasets["text"], tmp_path / "out")
    token_file = None
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", f"{READ_TOKEN}\n")
    else:
        token_file = tmp_path / "token"
        token_file.write_text(f"{READ_TOKEN}\n")
    config = TrainerConfig(
        spec=load_finetunejob(manifest).spec,
        token_file=str(token_file) if token_file else None,
    )
    (tmp_path / "config.yaml").write_text(config.to_yaml())

    with captured_logs() as logs:
        code = trainer(["--config", str(tmp_path / "config.yaml")])

    assert code == 4
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "ModelError"
    assert "/***/model does not exist" in written["message"]
    assert "/***/model does not exist" in logs.getvalue()
    assert_hidden(
        [READ_TOKEN], logs=logs.getvalue(), termination_message=termination_log.read_text()
    )
