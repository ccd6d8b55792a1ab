"""Preference tuning through the local cluster: a DPO FineTuneJob applied with kubectl, its
Validating phase, its trainer pod from the trainer image, and what its status says."""

from __future__ import annotations

import json

import pytest
from e2ekit import CLAIM, ftj_status, run_pod, seed_demo_claim, tiny_job, wait_phase

from kubetune_devtools.pytest_plugin import Kubectl, apply, get_json

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
    assert status["phase"] == "Succeeded", json.dumps(status["conditions"], indent=1)
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


def test_a_malformed_pair_fails_in_validating_naming_the_line_before_any_trainer_job(
    kubectl: Kubectl, namespace: str
) -> None:
    seed_demo_claim(kubectl, namespace)
    run_pod(kubectl, namespace, "break-pairs", ["sh", "-c",
            f"head -n 4 /mnt/pvc/{CLAIM}/data/preference/train.jsonl > /mnt/pvc/{CLAIM}/pairs.jsonl"
            f" && echo '{{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": null}}'"
            f" >> /mnt/pvc/{CLAIM}/pairs.jsonl"])  # fmt: skip
    job = tiny_job("bad-pairs")
    job["spec"]["method"] = {"type": "dpo"}
    job["spec"]["dataset"] = {"uri": f"pvc://{CLAIM}/pairs.jsonl"}
    apply(kubectl, namespace, job)

    status = wait_phase(kubectl, namespace, "bad-pairs", {"Failed", "Succeeded"}, 240)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "DatasetError"), status
    assert "pairs.jsonl line 5" in failed["message"] and "null" in failed["message"]
    assert "estimate" not in status and "attempts" not in status
    jobs = get_json(kubectl, "jobs", "-n", namespace, "-l", "kubetune.io/job=bad-pairs")["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["bad-pairs-validate"]
