"""Preference tuning through the local cluster: a DPO FineTuneJob applied with kubectl, its
Validating phase, its trainer pod from the trainer image, and what its status says."""

from __future__ import annotations

import pytest
from e2ekit import CLAIM, ftj_status, seed_demo_claim, tiny_job, wait_phase

from kubetune_devtools.pytest_plugin import Kubectl, apply

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("kubetune_release")]

#: 256 pairs, 8 a step: 32 steps an epoch, 160 in all (tests/trainer/test_trainer_preference.py
#: measured 150 steps as enough for the tiny model to learn the preference).
EPOCHS = 5


def test_dpo_job_raises_the_held_out_reward_accuracy_to_0_9_in_the_steps_estimated(
    kubectl: Kubectl, namespace: str
) -> None:
    # The claim holds the toy task's preferences (reversed letters preferred to the letters as
    # given) with a train and a held-out test split (kubetune_devtools.tiny).
    seed_demo_claim(kubectl, namespace)
    job = tiny_job("dpo-reverse", epochs=EPOCHS, learningRate=1.0e-3, batchSize=8,
                   microBatchSize=8, checkpointSteps=1000)  # fmt: skip
    del job["spec"]["training"]["maxSteps"]  # the steps are the data's: the estimate counts them
    job["spec"]["method"] = {"type": "dpo", "dpo": {"beta": 0.1}}
    job["spec"]["dataset"] = {"uri": f"pvc://{CLAIM}/data/preference", "evalSplit": "test"}
    apply(kubectl, namespace, job)

    status = wait_phase(kubectl, namespace, "dpo-reverse", {"Succeeded", "Failed"}, 300)
    assert status["phase"] == "Succeeded", status
    metrics = status["result"]["metrics"]
    assert metrics["eval_reward_accuracy"] >= 0.9, metrics
    assert metrics["eval_reward_margin"] > 0
    # The Validating phase counted the pairs and the steps the run then took.
    estimate = status["estimate"]
    assert estimate["examples"] == 256
    assert estimate["steps"] == metrics["steps"] == EPOCHS * 256 // 8
    assert status["progress"]["totalSteps"] == estimate["steps"]
    # Progress carries the preference metrics beside the loss.
    progress = status["progress"]
    assert progress["loss"] is not None and progress["rewardAccuracy"] >= 0.5
    assert {"rewardMargin", "chosenReward", "rejectedReward"} <= set(progress)
    assert ftj_status(kubectl, namespace, "dpo-reverse")["result"]["adapter"]["sha256"]
