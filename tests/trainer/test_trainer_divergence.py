"""A loss that becomes NaN or infinite fails the run at once, with exit 6 (Diverged, not
retried) and a message that names the step and the knob to turn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from trainer_helpers import TinyAssets, captured_logs, job_manifest, write_manifest

from kubetune.trainer.run.local_run import main as kubetune

pytestmark = pytest.mark.trainer


def test_a_run_whose_loss_turns_nan_stops_at_that_step_with_exit_6(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    # The highest learning rate the API accepts, with float16 matmuls (on the CPU the
    # activations around them stay float32, but the 4-bit layers' outputs overflow): the loss
    # is NaN by the third step.
    output = tmp_path / "out"
    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        output,
        training={"maxSteps": 40, "learningRate": 1.0, "loggingSteps": 20, "checkpointSteps": 20},
    )
    manifest["spec"]["quantization"]["computeDtype"] = "float16"
    path = write_manifest(tmp_path / "job.yaml", manifest)
    with captured_logs() as logs:
        code = kubetune(["train", str(path), "--no-progress"])

    assert code == 6, logs.getvalue()[-3000:]
    written = json.loads(termination_log.read_text())
    assert written["outcome"] == "Failed"
    assert written["reason"] == "Diverged"
    message = written["message"]
    assert message.startswith("the training loss became nan at step ")
    step = int(message.removeprefix("the training loss became nan at step ").split(":")[0])
    # Found at the step it happened, not at the next log (step 20) or the end (step 40).
    assert 1 < step < 20
    assert "lower spec.training.learningRate (now 1)" in message
    assert f"Diverged: {message}" in logs.getvalue()
    # Nothing that looks like a result, and no checkpoint of NaN weights.
    assert not (output / "adapter_model.safetensors").exists()
    assert not (output / "result.json").exists()
    assert not list((output / "checkpoints").glob("checkpoint-*"))
    metrics = (output / "metrics.jsonl").read_text().splitlines()
    assert all(math.isfinite(json.loads(line)["loss"]) for line in metrics)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), "NaN"])
def test_a_logged_loss_that_is_not_finite_is_a_divergence(loss: float | str) -> None:
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.errors import Diverged
    from kubetune.trainer.run.divergence import divergence_callback

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model"},
            "dataset": {"uri": "data.jsonl"},
            "output": {"uri": "out"},
            "training": {"learningRate": 0.05, "warmupRatio": 0.0},
        }
    )
    callback = divergence_callback(spec, running_loss=lambda: None)

    class State:
        global_step = 120

    callback.on_log(None, State(), None, logs={"loss": 1.5, "grad_norm": float("nan")})
    with pytest.raises(Diverged) as raised:
        callback.on_log(None, State(), None, logs={"loss": loss})
    assert raised.value.exit_code == 6
    assert raised.value.reason == "Diverged"
    assert raised.value.message.startswith(f"the training loss became {float(loss)} at step 120")
    assert "lower spec.training.learningRate (now 0.05)" in raised.value.message
    assert "raise spec.training.warmupRatio (now 0)" in raised.value.message
