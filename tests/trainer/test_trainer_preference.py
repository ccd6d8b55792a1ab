"""Preference tuning (``spec.method``: dpo, kto) on the tiny model: real NF4 4-bit through
bitsandbytes, real PEFT, TRL's DPOTrainer and KTOTrainer, on the CPU.

The synthetic preference set is the toy reversal task: for each prompt the reversed letters are
preferred to the letters as given (``kubetune_devtools.tiny.toy_preference_records``). The
reference model is the base with the adapter disabled, so before training every reward is 0
and the reward accuracy (the fraction of held-out pairs whose chosen answer gets the higher
reward) is 0; a DPO run that learned the preference raises it to at least 0.9.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import (
    TinyAssets,
    checkpoint_steps,
    config_reporting_progress,
    job_manifest,
    stop_with_sigterm_at,
    train_job,
)

from kubetune.api.config import TrainerConfig
from kubetune.trainer.cli import main as trainer_cli

pytestmark = pytest.mark.trainer

#: Enough to learn the preference on the tiny model (measured: held-out reward accuracy 0.9–1.0).
DPO_STEPS = 150
DPO_TRAINING = {
    "maxSteps": DPO_STEPS,
    "learningRate": 1.0e-3,
    "batchSize": 8,
    "microBatchSize": 8,
    "checkpointSteps": 1000,
    "loggingSteps": 10,
}


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each preference format as a folder with a train split and a held-out test split."""
    from kubetune_devtools.tiny import write_toy_preference_datasets

    return write_toy_preference_datasets(tmp_path_factory.mktemp("preference"))


def preference_job(
    tiny: TinyAssets,
    dataset: Path,
    output: Path,
    method: dict[str, Any],
    training: dict[str, Any],
    **dataset_extra: Any,
) -> dict[str, Any]:
    manifest = job_manifest(tiny.model, dataset, output, training=training,
                            dataset_extra=dataset_extra)  # fmt: skip
    manifest["spec"]["method"] = method
    return manifest


def trainer_config(path: Path, manifest: dict[str, Any]) -> Path:
    spec = manifest["spec"]
    document = {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainerConfig", "spec": spec}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def result_of(output: Path) -> dict[str, Any]:
    return dict(json.loads((output / "result.json").read_text()))


@pytest.fixture(scope="module")
def dpo_run(
    tiny: TinyAssets, preference_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, str, Path]:
    work = tmp_path_factory.mktemp("dpo")
    manifest = preference_job(
        tiny, preference_data["preference"], work / "adapter", {"type": "dpo"}, DPO_TRAINING,
        evalSplit="test",
    )  # fmt: skip
    code, logs = train_job(work / "job.yaml", manifest)
    return code, logs, work / "adapter"


def test_before_training_the_reward_accuracy_is_the_bases_and_not_0_9(
    tiny: TinyAssets, preference_data: dict[str, Path], tmp_path: Path
) -> None:
    """The run's own trainer, set up but not trained: its reference is the base with the
    adapter disabled, and the untrained adapter is that base, so no pair is preferred."""
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    manifest = preference_job(
        tiny, preference_data["preference"], tmp_path / "out", {"type": "dpo"}, DPO_TRAINING,
        evalSplit="test",
    )  # fmt: skip
    recipe = QLoRASFTRecipe(TrainerConfig(spec=manifest["spec"]))
    recipe.setup()
    before = recipe._trainer.evaluate()
    assert before["eval_rewards/accuracies"] < 0.9
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    from trl import DPOTrainer

    assert isinstance(recipe._trainer, DPOTrainer)
    assert recipe._trainer.ref_model is None  # the reference is the base, adapter disabled


def test_dpo_raises_the_held_out_reward_accuracy_to_0_9(dpo_run: tuple[int, str, Path]) -> None:
    code, logs, output = dpo_run
    assert code == 0, logs[-3000:]
    result = result_of(output)
    assert result["outcome"] == "Succeeded"
    assert result["metrics"]["steps"] == DPO_STEPS
    assert result["metrics"]["eval_reward_accuracy"] >= 0.9, result["metrics"]
    assert result["metrics"]["eval_reward_margin"] > 0


def test_dpo_result_and_metrics_carry_the_reward_metrics(dpo_run: tuple[int, str, Path]) -> None:
    code, logs, output = dpo_run
    assert code == 0, logs[-3000:]
    metrics = result_of(output)["metrics"]
    for name in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert name in metrics, metrics
    assert metrics["reward_margin"] == pytest.approx(
        metrics["chosen_reward"] - metrics["rejected_reward"], abs=1e-4
    )
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    assert [line["step"] for line in logged][-1] == DPO_STEPS
    assert all("reward_accuracy" in line for line in logged)
    assert any("eval_reward_accuracy" in line for line in lines)


def test_dpo_adapter_prefers_what_it_was_taught(
    tiny: TinyAssets, dpo_run: tuple[int, str, Path]
) -> None:
    """The saved adapter, loaded onto the 4-bit base through PEFT, gives the held-out chosen
    answers more probability than the base does, relative to the rejected ones."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from kubetune_devtools.tiny import toy_preference_records

    code, logs, output = dpo_run
    assert code == 0, logs[-3000:]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny.model, quantization_config=quantization,
                                                dtype=torch.float32)  # fmt: skip
    model = PeftModel.from_pretrained(base, str(output)).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)

    def logp(prompt: str, answer: str) -> float:
        ids = tokenizer(prompt + answer, return_tensors="pt").input_ids
        start = len(tokenizer(prompt).input_ids)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].log_softmax(-1)
        picked = logits.gather(1, ids[0, 1:, None])[:, 0]
        return float(picked[start - 1 :].sum())

    def preferred(adapter: bool) -> float:
        rows = toy_preference_records("preference", 32, seed=99)
        wins = 0
        for row in rows:
            if adapter:
                margin = logp(row["prompt"], row["chosen"]) - logp(row["prompt"], row["rejected"])
            else:
                with model.disable_adapter():
                    margin = logp(row["prompt"], row["chosen"]) - logp(
                        row["prompt"], row["rejected"]
                    )
            wins += margin > 0
        return wins / len(rows)

    assert preferred(adapter=True) >= 0.9
    assert preferred(adapter=True) > preferred(adapter=False)


def test_kto_on_unpaired_answers_runs_to_succeeded(
    tiny: TinyAssets, preference_data: dict[str, Path], tmp_path: Path
) -> None:
    training = {**DPO_TRAINING, "maxSteps": 10, "loggingSteps": 5}
    manifest = preference_job(
        tiny, preference_data["unpaired-preference"], tmp_path / "adapter",
        {"type": "kto", "kto": {"beta": 0.1}}, training,
    )  # fmt: skip
    code, logs = train_job(tmp_path / "job.yaml", manifest)
    assert code == 0, logs[-3000:]
    result = result_of(tmp_path / "adapter")
    assert (result["outcome"], result["metrics"]["steps"]) == ("Succeeded", 10)
    assert "chosen_reward" in result["metrics"] and "rejected_reward" in result["metrics"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_dpo_on_chat_message_pairs_trains(
    tiny: TinyAssets, preference_data: dict[str, Path], tmp_path: Path
) -> None:
    training = {**DPO_TRAINING, "maxSteps": 4, "loggingSteps": 2}
    manifest = preference_job(
        tiny, preference_data["preference-messages"], tmp_path / "adapter", {"type": "dpo"},
        training,
    )  # fmt: skip
    manifest["spec"]["evaluation"] = {"prompts": ["reverse: a b c =>"], "maxNewTokens": 4}
    code, logs = train_job(tmp_path / "job.yaml", manifest)
    assert code == 0, logs[-3000:]
    result = result_of(tmp_path / "adapter")
    assert result["outcome"] == "Succeeded"
    assert len(result["evaluation"]["samples"]) == 1


@pytest.mark.parametrize(
    ("fmt", "method", "training"),
    [
        ("preference", {"type": "dpo"}, {"epochs": 1, "batchSize": 12, "maxLength": 24}),
        ("preference-messages", {"type": "dpo"}, {"epochs": 2, "batchSize": 8}),
        ("unpaired-preference", {"type": "kto"}, {"epochs": 1, "batchSize": 16}),
        # KTO on pairs: TRL unpairs them, two examples a pair.
        ("preference", {"type": "kto"}, {"epochs": 1, "batchSize": 16}),
    ],
    ids=["dpo-text-truncated", "dpo-chat-two-epochs", "kto-unpaired", "kto-on-pairs"],
)
def test_the_estimate_counts_the_pairs_tokens_and_steps_the_run_will_train(
    tiny: TinyAssets,
    preference_data: dict[str, Path],
    tmp_path: Path,
    termination_log: Path,
    fmt: str,
    method: dict[str, Any],
    training: dict[str, Any],
) -> None:
    manifest = preference_job(tiny, preference_data[fmt], tmp_path / "out", method, {})
    manifest["spec"]["training"].pop("maxSteps")
    manifest["spec"]["training"].pop("microBatchSize")
    manifest["spec"]["training"].update(training)
    manifest["spec"].pop("evaluation", None)
    path = trainer_config(tmp_path / "config.yaml", manifest)

    code = trainer_cli(["preflight", "--config", str(path)])
    result = json.loads(termination_log.read_text())
    assert code == 0, result
    estimate = result["estimate"]

    # The run, set up for real from the same config: what it will iterate and for how long.
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    recipe = QLoRASFTRecipe(TrainerConfig.model_validate(yaml.safe_load(path.read_text())))
    recipe.setup()
    trainer = recipe._trainer
    rows = trainer.train_dataset
    steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    assert estimate["steps"] == steps
    assert estimate["sequences"] == len(rows)
    limit = recipe.spec.training.max_length
    answers = ["chosen_ids", "rejected_ids"] if method["type"] == "dpo" else ["completion_ids"]
    seen = sum(min(len(row["prompt_ids"]) + len(row[a]), limit) for row in rows for a in answers)
    assert estimate["tokens"] == seen
    assert estimate["plan"]["microBatchSize"] == recipe.plan.micro_batch_size
    if fmt == "preference" and method["type"] == "kto":
        assert estimate["sequences"] == 2 * estimate["examples"]
    if method["type"] == "dpo":
        assert "pairs" in result["message"]


MALFORMED = [
    ("preference", '{"prompt": "reverse: a b =>", "chosen": " b a", "rejected": null}', "null"),
    (
        "preference-messages",
        '{"prompt": [{"role": "user", "content": "reverse: a b =>"}], '
        '"chosen": [{"role": "assistant", "content": "b a"}], "rejected": [{"role": "assistant"}]}',
        "a list",
    ),
    (
        "unpaired-preference",
        '{"prompt": "reverse: a b =>", "completion": " b a", "label": null}',
        "null",
    ),
]


@pytest.mark.parametrize(("fmt", "line", "described"), MALFORMED, ids=["null", "message", "label"])
def test_a_malformed_pair_fails_the_preflight_naming_the_line_and_no_data(
    tiny: TinyAssets,
    preference_data: dict[str, Path],
    tmp_path: Path,
    termination_log: Path,
    fmt: str,
    line: str,
    described: str,
) -> None:
    good = (preference_data[fmt] / "train.jsonl").read_text().splitlines()[:3]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([*good, line]) + "\n")
    method = {"type": "kto" if fmt == "unpaired-preference" else "dpo"}
    manifest = preference_job(tiny, data, tmp_path / "out", method, {})
    path = trainer_config(tmp_path / "config.yaml", manifest)

    code = trainer_cli(["preflight", "--config", str(path)])
    result = json.loads(termination_log.read_text())
    assert code == 3, result
    assert result["reason"] == "DatasetError"
    message = result["message"]
    assert f"{data} line 4" in message
    assert described in message
    for value in ("reverse", " b a"):  # the data's words stay in the log
        assert value not in message


#: The resume scenario (as tests/trainer/test_trainer_resume.py runs it for SFT): SIGTERM once
#: progress reports STOP_AFTER, past the first checkpoint and before the next.
RESUME_STEPS, RESUME_CHECKPOINTS, STOP_AFTER = 24, 10, 13


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_sigterm_then_resume_gives_the_uninterrupted_runs_adapter(
    tiny: TinyAssets, preference_data: dict[str, Path], tmp_path: Path, method: str
) -> None:
    """Stopped by SIGTERM between checkpoints and started again (a retried pod), a preference
    run saves the adapter a run that was never stopped saves: weight by weight, within one
    bf16 rounding step (on the CPU measured bit for bit, as for SFT)."""
    import torch
    from safetensors.torch import load_file

    from kubetune_devtools.tiny import toy_eval_prompts

    fmt = "preference" if method == "dpo" else "unpaired-preference"
    training = {**DPO_TRAINING, "maxSteps": RESUME_STEPS, "checkpointSteps": RESUME_CHECKPOINTS,
                "loggingSteps": 4}  # fmt: skip
    manifest = preference_job(tiny, preference_data[fmt], tmp_path / "resumed",
                              {"type": method}, training)  # fmt: skip
    del manifest["spec"]["quantization"]["computeDtype"]  # the default: bfloat16
    manifest["spec"]["evaluation"] = {"prompts": [p for p, _ in toy_eval_prompts(1)],
                                      "maxNewTokens": 4}  # fmt: skip
    config_path, progress = config_reporting_progress(manifest, tmp_path)

    code, stderr, preempted = stop_with_sigterm_at(config_path, tmp_path, progress, STOP_AFTER)
    assert code == 143, stderr[-3000:]
    assert preempted["reason"] == "Preempted"
    stopped_at = max(checkpoint_steps(tmp_path / "resumed" / "checkpoints"))
    assert RESUME_CHECKPOINTS < stopped_at < RESUME_STEPS

    assert trainer_cli(["--config", str(config_path)]) == 0
    resumed = result_of(tmp_path / "resumed")
    assert resumed["metrics"]["resumed_from_step"] == stopped_at
    assert resumed["metrics"]["steps"] == RESUME_STEPS
    code, logs = train_job(tmp_path / "job.yaml", {**manifest, "spec": {
        **manifest["spec"], "output": {"uri": str(tmp_path / "straight")}}})  # fmt: skip
    assert code == 0, logs[-3000:]
    straight = result_of(tmp_path / "straight")
    assert resumed["metrics"]["train_loss"] == pytest.approx(
        straight["metrics"]["train_loss"], rel=0.01
    )

    ours = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, weight in theirs.items():
        assert ours[name].dtype == weight.dtype == torch.bfloat16, name
        torch.testing.assert_close(ours[name], weight, rtol=2.0**-7, atol=1e-6)


@pytest.mark.unit
def test_the_memory_plan_gives_kto_two_examples_a_micro_batch_and_dpo_twice_the_tokens() -> None:
    """The memory profile plans one row a micro-step; KTO's KL term needs two, and a DPO pair
    puts two sequences through each micro-step."""
    from kubetune.api.models import FineTuneJobSpec, plan_training
    from kubetune.trainer.plan.resolve import fit_to_card
    from kubetune.trainer.plan.shape import ModelShape
    from kubetune.trainer.plan.speed import resolve_speed

    shape = ModelShape.from_config({"hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000})  # fmt: skip
    plans = {}
    for method in ("sft", "dpo", "kto"):
        spec = FineTuneJobSpec.model_validate({
            "model": {"uri": "m"}, "dataset": {"uri": "d"}, "output": {"uri": "o"},
            "method": {"type": method}, "training": {"profile": "memory", "maxLength": 1024},
        })  # fmt: skip
        plan = plan_training(spec.training, 1)
        speed = resolve_speed(spec.training, cuda=True, varlen_runs=False)
        fitted = fit_to_card(spec, plan, speed, shape, cuda=True, free_bytes=80 * 2**30)
        plans[method] = fitted.memory
    assert plans["sft"].micro_batch_size == plans["dpo"].micro_batch_size == 1
    assert plans["kto"].micro_batch_size == 2
    assert plans["dpo"].tokens_per_micro_step == 2 * plans["sft"].tokens_per_micro_step
    assert plans["dpo"].estimated_peak_bytes > plans["sft"].estimated_peak_bytes
