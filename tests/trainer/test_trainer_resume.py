"""Preemption and resume: a run stopped by SIGTERM between two checkpoints and started again
gives the adapter and the metrics of a run that was never stopped.

Both runs use the default compute dtype (bfloat16) and evaluation prompts, as a laptop run with
the defaults would. The adapters are compared weight by weight: on the CPU a resumed run
reproduces the uninterrupted one bit for bit (measured: max |difference| 0.0); the stated
tolerance, for devices and thread counts that reorder reductions, is one bf16 rounding step
(relative 2**-7) plus 1e-6 absolute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import (
    TinyAssets,
    checkpoint_steps,
    config_reporting_progress,
    job_manifest,
    trainer_command,
    write_manifest,
)

pytestmark = pytest.mark.trainer

MAX_STEPS = 40
CHECKPOINT_STEPS = 15
LOGGING_STEPS = 5
#: SIGTERM is sent once progress reports this step: past the first checkpoint, before the next.
STOP_AFTER = 18
#: The stated tolerance for adapter weights (see the module docstring).
RTOL, ATOL = 2.0**-7, 1e-6


@dataclass(frozen=True)
class Runs:
    resumed: Path
    straight: Path
    stopped_at: int
    preempted_exit_code: int
    preempted_message: dict[str, Any]
    metrics_lines_before_restart: int
    resume_logs: str
    straight_exit_code: int
    straight_stdout: str


def _reported_step(progress: Path) -> int:
    try:
        return int(json.loads(progress.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _stop_with_sigterm_mid_interval(config: Path, work: Path, progress: Path) -> tuple[int, str]:
    env = {
        **os.environ,
        "KUBETUNE_TERMINATION_LOG": str(work / "termination-preempted"),
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.Popen(
        trainer_command(config),
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while _reported_step(progress) < STOP_AFTER:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, f"step {STOP_AFTER} not reached within 240 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stderr


@pytest.fixture(scope="module")
def runs(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """One run stopped by SIGTERM and restarted (as a retried pod would be), and the same job
    run straight through with `kubetune train`."""
    import contextlib
    import io
    import logging

    from kubetune.trainer.cli import main as trainer
    from kubetune.trainer.run.local_run import main as kubetune
    from kubetune_devtools.tiny import toy_eval_prompts

    work = tmp_path_factory.mktemp("resume")
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        work / "resumed",
        training={
            "maxSteps": MAX_STEPS,
            "checkpointSteps": CHECKPOINT_STEPS,
            "loggingSteps": LOGGING_STEPS,
        },
        evaluation={"prompts": [p for p, _ in toy_eval_prompts(2)], "maxNewTokens": 4},
    )
    del manifest["spec"]["quantization"]["computeDtype"]  # the default: bfloat16
    config_path, progress = config_reporting_progress(manifest, work)

    exit_code, stderr = _stop_with_sigterm_mid_interval(config_path, work, progress)
    assert exit_code == 143, stderr[-3000:]
    preempted = json.loads((work / "termination-preempted").read_text())
    stopped_at = max(checkpoint_steps(work / "resumed" / "checkpoints"))
    before = len((work / "resumed" / "metrics.jsonl").read_text().splitlines())

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBETUNE_TERMINATION_LOG", str(work / "termination-resumed"))
        logging.getLogger().addHandler(handler)
        try:
            assert trainer(["--config", str(config_path)]) == 0, logs.getvalue()[-3000:]
        finally:
            logging.getLogger().removeHandler(handler)
        env.setenv("KUBETUNE_TERMINATION_LOG", str(work / "termination-straight"))
        path = write_manifest(work / "job.yaml", manifest)
        with contextlib.redirect_stdout(stdout):
            straight_exit_code = kubetune(
                ["train", str(path), "--output", str(work / "straight"), "--no-progress"]
            )
    yield Runs(
        resumed=work / "resumed",
        straight=work / "straight",
        stopped_at=stopped_at,
        preempted_exit_code=exit_code,
        preempted_message=preempted,
        metrics_lines_before_restart=before,
        resume_logs=logs.getvalue(),
        straight_exit_code=straight_exit_code,
        straight_stdout=stdout.getvalue(),
    )


def _result(output: Path) -> dict[str, Any]:
    return dict(json.loads((output / "result.json").read_text()))


def _metrics(output: Path) -> list[dict[str, Any]]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


def test_sigterm_between_checkpoints_saves_that_step_and_exits_143(runs: Runs) -> None:
    assert runs.preempted_message["reason"] == "Preempted"
    assert "resume" in runs.preempted_message["message"]
    assert CHECKPOINT_STEPS < runs.stopped_at < MAX_STEPS
    assert runs.stopped_at % CHECKPOINT_STEPS != 0  # saved because of SIGTERM, not the interval


def test_restart_continues_from_the_step_it_stopped_at(runs: Runs) -> None:
    assert f"step {runs.stopped_at})" in runs.resume_logs
    result = _result(runs.resumed)
    assert result["outcome"] == "Succeeded"
    assert result["metrics"]["steps"] == MAX_STEPS
    assert result["metrics"]["resumed_from_step"] == runs.stopped_at
    steps = [line["step"] for line in _metrics(runs.resumed)]
    assert steps == sorted(set(steps))  # no step logged twice across the two attempts
    progress = json.loads((runs.resumed.parent / "progress.json").read_text())
    assert progress["step"] == MAX_STEPS and progress["percent"] == 100.0


def test_kubetune_train_with_the_default_compute_dtype_and_evaluation_prompts_succeeds(
    runs: Runs,
) -> None:
    assert runs.straight_exit_code == 0, runs.straight_stdout
    result = _result(runs.straight)
    assert result["outcome"] == "Succeeded"
    assert len(result["evaluation"]["samples"]) == 2
    assert len(_result(runs.resumed)["evaluation"]["samples"]) == 2


def test_resumed_adapter_is_the_uninterrupted_runs_adapter(runs: Runs) -> None:
    import torch
    from safetensors.torch import load_file

    resumed_file = runs.resumed / "adapter_model.safetensors"
    straight_file = runs.straight / "adapter_model.safetensors"
    assert resumed_file.stat().st_size == straight_file.stat().st_size
    resumed, straight = load_file(resumed_file), load_file(straight_file)
    assert resumed.keys() == straight.keys()
    for name, weight in straight.items():
        assert resumed[name].dtype == weight.dtype == torch.bfloat16, name
        torch.testing.assert_close(resumed[name], weight, rtol=RTOL, atol=ATOL)


def test_metrics_across_the_resume_are_the_runs(runs: Runs) -> None:
    resumed, straight = _result(runs.resumed), _result(runs.straight)
    train_loss = resumed["metrics"]["train_loss"]
    assert train_loss == pytest.approx(straight["metrics"]["train_loss"], rel=0.01)
    logged_resumed, logged_straight = _metrics(runs.resumed), _metrics(runs.straight)
    assert [m["step"] for m in logged_resumed] == [m["step"] for m in logged_straight]
    for ours, theirs in zip(logged_resumed, logged_straight, strict=True):
        # The first log after the restart averages over the whole logging interval too.
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=0.01), ours["step"]
    after_restart = logged_resumed[runs.metrics_lines_before_restart :]
    assert after_restart and after_restart[0]["step"] > runs.stopped_at
    assert all(m["tokens_per_second"] is not None for m in after_restart)
    assert resumed["metrics"]["tokens_per_second"] > 0
