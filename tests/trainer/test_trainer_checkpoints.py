"""Checkpoints: which one a restart resumes, who may resume them, and what a resume carries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api.config import JobRef, TrainerConfig
from kubetune.api.models import FineTuneJobSpec
from kubetune.trainer.errors import InvalidConfig
from kubetune.trainer.publish.outputs import forget_metrics_after
from kubetune.trainer.run.checkpoints import (
    RemoteCheckpoints,
    claim,
    newest_checkpoint,
    run_identity,
)
from kubetune.trainer.run.resume import RunningTotals

pytestmark = pytest.mark.unit

ME = "finetunejob/0000-mine"
OUTPUT = "pvc://adapters/support"


def _checkpoint(directory: Path, step: int, complete: bool = True) -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_a_restart_resumes_the_newest_completely_written_checkpoint(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10)
    expected = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, complete=False)  # the pod was killed while writing it
    assert newest_checkpoint(tmp_path) == expected
    assert newest_checkpoint(tmp_path / "missing") is None


def test_a_job_is_identified_by_its_uid_and_a_local_run_by_its_spec() -> None:
    spec = FineTuneJobSpec.model_validate(
        {"model": {"uri": "org/m"}, "dataset": {"uri": "d.jsonl"}, "output": {"uri": "/tmp/o"}}
    )
    job = TrainerConfig(spec=spec, job=JobRef(name="j", namespace="n", uid="1234"))
    assert run_identity(job) == "finetunejob/1234"
    local = run_identity(TrainerConfig(spec=spec))
    assert local.startswith("spec/") and local == run_identity(TrainerConfig(spec=spec))


def test_the_first_run_claims_an_empty_output_and_may_resume_its_own(tmp_path: Path) -> None:
    checkpoints = tmp_path / "out" / "checkpoints"
    claim(checkpoints, ME, OUTPUT)
    assert json.loads((checkpoints / "run.json").read_text()) == {"run": ME}
    _checkpoint(checkpoints, 10)
    claim(checkpoints, ME, OUTPUT, finished=True)  # a retried pod of the same run


def _refused(checkpoints: Path, finished: bool = False) -> str:
    with pytest.raises(InvalidConfig) as refused:
        claim(checkpoints, ME, OUTPUT, finished)
    assert refused.value.exit_code == 2
    return refused.value.message


def test_another_runs_checkpoints_are_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10)
    (tmp_path / "run.json").write_text('{"run": "finetunejob/another"}')
    assert "checkpoints of another run (finetunejob/another)" in _refused(tmp_path)


@pytest.mark.parametrize("marker", ["[]", "not json {", '{"run": 7}', "\xff"])
def test_checkpoints_with_an_unreadable_marker_are_refused(tmp_path: Path, marker: str) -> None:
    _checkpoint(tmp_path, 10)
    (tmp_path / "run.json").write_text(marker, encoding="latin-1")
    assert "a run it can't identify" in _refused(tmp_path)


def test_checkpoints_without_a_marker_are_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10, complete=False)
    message = _refused(tmp_path)
    assert "no marker (run.json)" in message and OUTPUT in message
    assert not (tmp_path / "run.json").exists()


def test_another_runs_finished_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"run": "finetunejob/another"}')
    assert "finished adapter of another run" in _refused(tmp_path, finished=True)
    (tmp_path / "run.json").unlink()
    assert "a finished adapter but no marker" in _refused(tmp_path, finished=True)


def test_a_marker_with_nothing_behind_it_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"run": "finetunejob/another"}')
    claim(tmp_path, ME, OUTPUT)
    assert json.loads((tmp_path / "run.json").read_text()) == {"run": ME}


def test_metrics_logged_after_the_resumed_checkpoint_are_dropped(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)))
    assert forget_metrics_after(metrics, 10) == 1
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [5, 10]
    assert forget_metrics_after(tmp_path / "none.jsonl", 10) == 0


def test_running_totals_travel_with_the_checkpoint(tmp_path: Path) -> None:
    totals = RunningTotals(
        logged_loss=12.5, pending_loss=3.25, last_logged_step=10, train_seconds=42.0
    )
    totals.write(tmp_path / "checkpoint-13")
    assert RunningTotals.read(tmp_path / "checkpoint-13") == totals
    (tmp_path / "checkpoint-13" / "kubetune_running_totals.json").write_text("[]")
    assert RunningTotals.read(tmp_path / "checkpoint-13") is None


# --- the same rule in an object store (fsspec's in-memory store: a real fsspec filesystem) -----


@pytest.fixture
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    import fsspec

    prefix = f"memory://bucket/{request.node.name}"
    yield prefix
    fs, root = fsspec.core.url_to_fs(prefix)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _put(uri: str, data: bytes = b"{}") -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe_file(path, data)


def test_an_object_store_output_is_claimed_by_its_first_run(store: str, tmp_path: Path) -> None:
    RemoteCheckpoints(store, tmp_path).claim(ME, "adapter_model.safetensors")
    _put(f"{store}/checkpoints/checkpoint-5/trainer_state.json")
    RemoteCheckpoints(store, tmp_path).claim(ME, "adapter_model.safetensors")  # a retried pod
    with pytest.raises(InvalidConfig, match=r"already holds the checkpoints of another run"):
        RemoteCheckpoints(store, tmp_path).claim("finetunejob/theirs", "adapter_model.safetensors")


def test_an_object_store_with_checkpoints_and_no_marker_is_refused(
    store: str, tmp_path: Path
) -> None:
    _put(f"{store}/checkpoints/checkpoint-5/trainer_state.json")
    with pytest.raises(InvalidConfig, match=r"holds checkpoints but no marker \(run.json\)"):
        RemoteCheckpoints(store, tmp_path).claim(ME, "adapter_model.safetensors")


def test_an_object_store_holding_another_runs_adapter_is_refused(
    store: str, tmp_path: Path
) -> None:
    _put(f"{store}/checkpoints/run.json", json.dumps({"run": "finetunejob/theirs"}).encode())
    _put(f"{store}/adapter_model.safetensors", b"weights")
    with pytest.raises(InvalidConfig, match=r"finished adapter of another run"):
        RemoteCheckpoints(store, tmp_path).claim(ME, "adapter_model.safetensors")
