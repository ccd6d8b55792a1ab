"""A model folder on a claim, as a tenant may shape it: every file of it stays inside the claim,
and nothing secret that reached its text files leaves with the saved adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_helpers import FAKE_TOKEN, TinyAssets, job_manifest, train_job

pytestmark = pytest.mark.trainer


@pytest.fixture
def claim(tiny: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A claim ``models`` under the pvc root holding a copy of the tiny model at ``tiny/``;
    a (fake) hub token in the environment, as a trainer pod has it."""
    root = tmp_path / "pvc"
    shutil.copytree(tiny.model, root / "models" / "tiny")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return root / "models"


def _train(tiny: TinyAssets, tmp_path: Path) -> tuple[int, str, Path]:
    output = tmp_path / "out"
    manifest = job_manifest(tiny.model, tiny.datasets["prompt-completion"], output,
                            training={"maxSteps": 2})  # fmt: skip
    manifest["spec"]["model"]["uri"] = "pvc://models/tiny"
    code, logs = train_job(tmp_path / "job.yaml", manifest)
    return code, logs, output


def _written(folder: Path) -> str:
    if not folder.exists():
        return ""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*")
                   if p.is_file())  # fmt: skip


@pytest.mark.parametrize(
    "link", ["/proc/self/environ", "outside"], ids=["process-environment", "outside-the-claim"]
)
def test_a_model_file_linked_out_of_its_claim_is_refused_before_it_is_read(
    tiny: TinyAssets, tmp_path: Path, claim: Path, termination_log: Path, link: str
) -> None:
    target = Path(link) if link.startswith("/") else tmp_path / link
    if not link.startswith("/"):
        target.write_text(f"{{# another tenant's file {FAKE_TOKEN} #}}")
    template = claim / "tiny" / "chat_template.jinja"
    template.unlink()
    template.symlink_to(target)

    code, logs, output = _train(tiny, tmp_path)
    assert code == 2, logs[-3000:]
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "InvalidConfig"
    assert written["message"] == (
        f"model.uri: {template} leads out of its claim (to {target.resolve()})"
    )
    assert not (output / "adapter_model.safetensors").exists()
    assert FAKE_TOKEN not in _written(output) + termination_log.read_text() + logs


def test_a_model_folder_linked_within_its_claim_still_trains(
    tiny: TinyAssets, tmp_path: Path, claim: Path
) -> None:
    # Links that stay in the claim (a hub cache's snapshot links to its blobs) are fine.
    blobs = claim / "blobs"
    blobs.mkdir()
    template = claim / "tiny" / "chat_template.jinja"
    template.rename(blobs / "template")
    template.symlink_to(blobs / "template")

    code, logs, output = _train(tiny, tmp_path)
    assert code == 0, logs[-3000:]
    assert (output / "adapter_model.safetensors").is_file()


def test_a_secret_in_a_model_folders_text_files_is_redacted_from_the_saved_adapter(
    tiny: TinyAssets, tmp_path: Path, claim: Path
) -> None:
    template = claim / "tiny" / "chat_template.jinja"
    template.write_text(template.read_text() + f"{{# {FAKE_TOKEN} #}}")

    code, logs, output = _train(tiny, tmp_path)
    assert code == 0, logs[-3000:]
    saved = output / "chat_template.jinja"
    assert saved.is_file()  # the tokenizer's files are saved (and published) with the adapter
    assert FAKE_TOKEN not in _written(output)
    assert "***" in saved.read_text()
