"""Data-parallel training on the CPU with gloo, through the pod's own command.

``kubetune-trainer`` with ``resources.gpus: 2`` starts two ranks itself (torch.distributed's
elastic agent, standalone rendezvous); with ``resources.nodes: 2`` two such launchers, as two
pods of an Indexed Job would be, meet at a c10d rendezvous on loopback. Every run is a real 4-bit
NF4 training of the tiny model, and what is checked is what a pod shows: exit codes, the one
termination message, the files in the output.

The stated tolerance between the two-rank and the one-rank adapter: TRL keeps a QLoRA adapter's
weights, and so its gradients, in bf16. Two ranks average two half-batch bf16 gradients where one
rank accumulates one, so each step's gradient may differ by a bf16 rounding (2**-8 relative), and
Adam carries that forward. Measured on this task (two one-rank pods against one rank, 12 steps):
the largest relative difference (Frobenius) of a LoRA tensor 2.2%, the lowest cosine similarity
0.99975. The tests allow 5% and 0.999.
"""

from __future__ import annotations

import json
import os
import signal
import socket
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
)

#: Thirteen trainer processes start here (three launchers with two ranks each, two one-rank
#: pods, and the launchers' own); on a loaded 2-core machine each takes minutes to import torch.
pytestmark = [pytest.mark.trainer, pytest.mark.timeout(2400)]

MAX_STEPS = 12
CHECKPOINT_STEPS = 5
#: SIGTERM goes to the launcher once progress reports this step: past the first checkpoint.
STOP_AFTER = 6
#: The stated tolerance (see the module docstring).
MAX_RELATIVE_DIFFERENCE, MIN_COSINE = 0.05, 0.999
#: Every run here ends well within this on a busy 2-core machine (each takes 2-5 minutes).
DEADLINE = 900


@dataclass(frozen=True)
class Run:
    exit_code: int
    output: Path
    termination: dict[str, Any]
    stderr: str


@dataclass(frozen=True)
class Runs:
    preempted: Run
    stopped_at: int
    #: The files of each rank's random state in the checkpoint of that step.
    random_states_at_stop: list[str]
    resumed: Run
    one_rank: Run
    pods: list[Run]
    bad_dataset: Run


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(
    tiny: TinyAssets,
    work: Path,
    name: str,
    resources: dict[str, int],
    micro_batch: int,
    dataset: Path | None = None,
) -> Path:
    manifest = job_manifest(
        tiny.model,
        dataset or tiny.datasets["prompt-completion"],
        work / name,
        training={
            "maxSteps": MAX_STEPS,
            "checkpointSteps": CHECKPOINT_STEPS,
            "loggingSteps": 1,
            "batchSize": 16,
            "microBatchSize": micro_batch,
        },
    )
    manifest["spec"]["resources"] = resources
    return config_reporting_progress(manifest, work, name)[0]


def _start(config: Path, work: Path, name: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        trainer_command(config),
        cwd=work,
        env={
            **os.environ,
            "KUBETUNE_TERMINATION_LOG": str(work / f"{name}.termination"),
            "OMP_NUM_THREADS": "1",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str], work: Path, name: str, output: str) -> Run:
    try:
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
    termination = work / f"{name}.termination"
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return Run(process.returncode, work / output, message, stderr)


def _reported_step(progress: Path) -> int:
    try:
        return int(json.loads(progress.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def runs(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Two ranks in one pod stopped by SIGTERM and started again; two one-rank pods meeting at a
    c10d rendezvous; two ranks on a dataset they can't use; and one rank, for comparison. The
    pods and the bad dataset run beside the rest."""
    from kubetune.trainer.cli import main as trainer

    work = tmp_path_factory.mktemp("distributed")
    bad = work / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "c"}\n')
    background = {
        "bad-dataset": _start(
            _config(tiny, work, "bad-dataset", {"gpus": 2}, 8, dataset=bad), work, "bad-dataset"
        )
    }
    pods = _config(tiny, work, "pods", {"gpus": 0, "nodes": 2}, 8)
    endpoint = f"127.0.0.1:{_free_port()}"
    for index in (0, 1):
        background[f"pod-{index}"] = _start(
            pods,
            work,
            f"pod-{index}",
            JOB_COMPLETION_INDEX=str(index),
            KUBETUNE_RENDEZVOUS_ENDPOINT=endpoint,
            KUBETUNE_RENDEZVOUS_ID="pods-attempt-1",
        )
    try:
        two_ranks = _config(tiny, work, "two-ranks", {"gpus": 2}, 8)
        process = _start(two_ranks, work, "preempted")
        progress = work / "two-ranks.progress.json"
        deadline = time.monotonic() + DEADLINE
        while _reported_step(progress) < STOP_AFTER:
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        preempted = _finish(process, work, "preempted", "two-ranks")
        stopped_at = max(checkpoint_steps(work / "two-ranks" / "checkpoints"), default=0)
        stopped = work / "two-ranks" / "checkpoints" / f"checkpoint-{stopped_at}"
        random_states = sorted(p.name for p in stopped.glob("rng_state*"))
        resumed = _finish(_start(two_ranks, work, "resumed"), work, "resumed", "two-ranks")

        one_rank = _config(tiny, work, "one-rank", {"gpus": 1}, 16)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("KUBETUNE_TERMINATION_LOG", str(work / "one-rank.termination"))
            code = trainer(["--config", str(one_rank)])
        termination = json.loads((work / "one-rank.termination").read_text())
        finished = {
            name: _finish(p, work, name, "pods" if name.startswith("pod") else name)
            for name, p in background.items()
        }
    finally:
        for leftover in background.values():
            if leftover.poll() is None:
                leftover.kill()
    yield Runs(
        preempted=preempted,
        stopped_at=stopped_at,
        random_states_at_stop=random_states,
        resumed=resumed,
        one_rank=Run(code, work / "one-rank", termination, ""),
        pods=[finished["pod-0"], finished["pod-1"]],
        bad_dataset=finished["bad-dataset"],
    )


def _adapter(output: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(output / "adapter_model.safetensors")))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigterm_to_the_pod_stops_both_ranks_at_one_checkpoint_and_exits_143(runs: Runs) -> None:
    run = runs.preempted
    assert run.exit_code == 143, run.stderr[-3000:]
    assert run.termination["reason"] == "Preempted"
    assert f"at step {runs.stopped_at};" in run.termination["message"]
    assert STOP_AFTER <= runs.stopped_at < MAX_STEPS
    assert runs.stopped_at % CHECKPOINT_STEPS != 0  # saved because of SIGTERM, not the interval
    # One checkpoint of that step, with the random state of each of the two ranks.
    assert runs.random_states_at_stop == ["rng_state_0.pth", "rng_state_1.pth"]


def test_two_ranks_in_one_pod_resume_and_publish_one_adapter(runs: Runs) -> None:
    run = runs.resumed
    assert run.exit_code == 0, run.stderr[-3000:]
    result = json.loads((run.output / "result.json").read_text())
    assert result["outcome"] == "Succeeded"
    assert result["metrics"]["steps"] == MAX_STEPS
    assert result["metrics"]["resumed_from_step"] == runs.stopped_at
    assert result["plan"]["microBatchSize"] == 8  # the batch of 16, halved for each rank
    # The one termination message is the group's result, with the adapter's digest.
    weights = run.output / "adapter_model.safetensors"
    assert run.termination["adapter"]["sha256"] == _sha256(weights) == result["adapter"]["sha256"]
    assert run.termination["message"] == result["message"]
    # Rank 0 alone logged: every step once, over both attempts.
    metrics = [json.loads(line) for line in (run.output / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, MAX_STEPS + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_two_rank_adapter_matches_the_one_rank_adapter(runs: Runs) -> None:
    import torch

    assert runs.one_rank.exit_code == 0
    assert runs.one_rank.termination["metrics"]["steps"] == MAX_STEPS
    two, one = _adapter(runs.resumed.output), _adapter(runs.one_rank.output)
    assert two.keys() == one.keys()
    for name, reference in one.items():
        a, b = two[name].float().flatten(), reference.float().flatten()
        relative = float((a - b).norm() / b.norm())
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        assert relative <= MAX_RELATIVE_DIFFERENCE, f"{name}: {relative:.4f}"
        assert cosine >= MIN_COSINE, f"{name}: {cosine:.5f}"


def test_two_pods_meet_at_a_c10d_rendezvous_and_report_one_result(runs: Runs) -> None:
    for pod in runs.pods:
        assert pod.exit_code == 0, pod.stderr[-3000:]
    first, second = (pod.termination for pod in runs.pods)
    assert first == second  # each pod reports the group's result
    assert first["outcome"] == "Succeeded"
    output = runs.pods[0].output
    assert first["adapter"]["sha256"] == _sha256(output / "adapter_model.safetensors")
    assert json.loads((output / "result.json").read_text())["metrics"]["steps"] == MAX_STEPS


def test_a_dataset_every_rank_rejects_fails_the_pod_with_exit_3_and_its_reason(
    runs: Runs,
) -> None:
    run = runs.bad_dataset
    assert run.exit_code == 3, run.stderr[-3000:]
    assert run.termination["reason"] == "DatasetError"
    assert "bad.jsonl" in run.termination["message"] and "line 2" in run.termination["message"]
    assert not (run.output / "adapter_model.safetensors").exists()
