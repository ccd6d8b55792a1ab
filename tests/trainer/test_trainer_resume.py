"""Preemption: SIGTERM checkpoints and stops; the next start continues from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import TinyAssets, job_manifest

from kubetune.api.config import TrainerConfig
from kubetune.api.manifest import load_finetunejob


def _trainer_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("kubetune-trainer")
    if script.exists():
        return [str(script), "--config", str(config)]
    return [sys.executable, "-m", "kubetune.trainer.cli", "--config", str(config)]


def _checkpoint_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1])
        for p in directory.iterdir()
        if p.name.startswith("checkpoint-") and (p / "trainer_state.json").exists()
    )


def test_sigterm_checkpoints_and_a_restart_continues_from_that_step(
    tiny: TinyAssets, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "out"
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        output,
        training={"maxSteps": 200, "checkpointSteps": 10, "loggingSteps": 5},
    )
    config = TrainerConfig(
        spec=load_finetunejob(manifest).spec,
        progress={
            "reporter": "file",
            "file": str(tmp_path / "progress.json"),
            "intervalSeconds": 0.1,
        },
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config.to_yaml())
    first_log = tmp_path / "termination-first"
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(first_log), "OMP_NUM_THREADS": "1"}

    process = subprocess.Popen(
        _trainer_command(config_path),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _checkpoint_steps(output / "checkpoints"):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 143, stderr[-3000:]
    preempted = json.loads(first_log.read_text())
    assert preempted["reason"] == "Preempted"
    assert "resume" in preempted["message"]
    stopped_at = max(_checkpoint_steps(output / "checkpoints"))
    assert 10 <= stopped_at < 200
    assert not (output / "result.json").exists()

    from kubetune.trainer.cli import main as trainer

    logged_before = len((output / "metrics.jsonl").read_text().splitlines())
    with caplog.at_level("INFO"):
        assert trainer(["--config", str(config_path)]) == 0
    assert f"step {stopped_at})" in caplog.text
    lines = (output / "metrics.jsonl").read_text().splitlines()[logged_before:]
    steps_after_restart = [json.loads(line)["step"] for line in lines]
    assert steps_after_restart and min(steps_after_restart) > stopped_at
    result = json.loads((output / "result.json").read_text())
    assert result["outcome"] == "Succeeded"
    assert result["metrics"]["steps"] == 200
    assert result["metrics"]["resumed_from_step"] == stopped_at
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["step"] == 200 and progress["totalSteps"] == 200
    assert progress["percent"] == 100.0
