"""The FineTuneJob API as a user meets it: defaults that keep manifests short, and errors that
name the field, say what was wrong and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.config import TrainerConfig, load_trainer_config
from kubetune.api.errors import ConfigError, SpecError
from kubetune.api.manifest import load_finetunejob
from kubetune.api.models import plan_training

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "llama2-qlora.yaml"

MINIMAL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"uri": "meta-llama/Llama-2-7b-hf"},
        "dataset": {"uri": "pvc://data/train.jsonl"},
        "output": {"uri": "pvc://adapters/minimal"},
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    """The minimal manifest with spec sections replaced or merged in."""
    manifest = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        current = manifest["spec"].get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            current.update(value)
        else:
            manifest["spec"][key] = value
    return manifest


def test_seed_example_maps_one_to_one() -> None:
    job = load_finetunejob(SEED)
    spec = job.spec
    assert job.name == "llama2-support"
    assert spec.model.uri == "meta-llama/Llama-2-7b-hf"
    assert spec.model.revision == "main"
    assert spec.model.token_secret_ref is not None
    assert (spec.model.token_secret_ref.name, spec.model.token_secret_ref.key) == (
        "hf-token",
        "token",
    )
    assert spec.dataset.uri == "pvc://data/support.jsonl"
    assert spec.dataset.format == "auto"
    assert (spec.quantization.type, spec.quantization.double_quant) == ("nf4", True)
    assert spec.quantization.compute_dtype == "bfloat16"
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert spec.lora.target_modules == ["all-linear"]
    assert spec.training.epochs == 3
    assert spec.training.learning_rate == 5.0e-4
    assert spec.training.batch_size == 16
    assert spec.training.max_length == 2048
    assert spec.output.uri == "pvc://adapters/llama2-support"
    assert spec.resources.gpus == 1


def test_seed_example_is_ten_lines_of_spec() -> None:
    manifest = yaml.safe_load(SEED.read_text())
    assert len(yaml.safe_dump(manifest["spec"], default_flow_style=True).splitlines()) <= 10
    assert len(manifest["spec"]) <= 10


EXAMPLE_JOBS = sorted(
    p for p in (ROOT / "examples").glob("*.yaml") if "kind: FineTuneJob" in p.read_text()
)


def test_examples_include_the_promised_jobs() -> None:
    assert {p.name for p in EXAMPLE_JOBS} >= {
        "llama2-qlora.yaml",
        "chat-messages.yaml",
        "s3-output.yaml",
        "tiny-cpu.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLE_JOBS, ids=lambda p: p.name)
def test_every_example_job_validates(path: Path) -> None:
    load_finetunejob(path)


def test_minimal_job_gets_qlora_defaults() -> None:
    spec = load_finetunejob(MINIMAL).spec
    assert spec.quantization.type == "nf4"
    assert spec.quantization.double_quant is True
    assert spec.quantization.compute_dtype == "bfloat16"
    assert spec.lora.target_modules == ["all-linear"]
    assert spec.resources.gpus == 1
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert spec.run_policy.backoff_limit == 3
    assert spec.model.trust_remote_code is False


def test_training_plan_defaults_to_three_epochs_and_splits_the_batch() -> None:
    plan = plan_training(load_finetunejob(MINIMAL).spec.training, gpus=1)
    assert plan.epochs == 3
    assert plan.max_steps is None
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (4, 4)


def test_training_plan_honours_explicit_micro_batch() -> None:
    spec = load_finetunejob(with_spec(training={"batchSize": 16, "microBatchSize": 2})).spec
    plan = plan_training(spec.training, gpus=1)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (2, 8)


def test_quantities_accept_numbers_and_strings() -> None:
    spec = load_finetunejob(with_spec(resources={"cpu": 4, "memory": "16Gi"})).spec
    assert (spec.resources.cpu, spec.resources.memory) == ("4", "16Gi")


# Each invalid manifest, and the words its error must contain: the field and what is allowed.
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "missing model",
        {"spec": {"dataset": {"uri": "x"}, "output": {"uri": "y"}}},
        ["spec.model", "required"],
    ),
    (
        "missing output",
        {"spec": {"model": {"uri": "m"}, "dataset": {"uri": "x"}}},
        ["spec.output", "required"],
    ),
    ("unknown top-level field", with_spec(epochs=3), ["spec.epochs", "unknown field", "training"]),
    (
        "unknown nested field",
        with_spec(lora={"rank": 8}),
        ["spec.lora.rank", "unknown field", "r, alpha"],
    ),
    (
        "bad quantization type",
        with_spec(quantization={"type": "int8"}),
        ["spec.quantization.type", "'nf4'", "'fp4'"],
    ),
    (
        "bad compute dtype",
        with_spec(quantization={"computeDtype": "bf16"}),
        ["spec.quantization.computeDtype", "'bfloat16'"],
    ),
    (
        "unknown dataset format",
        with_spec(dataset={"uri": "d.jsonl", "format": "sharegpt"}),
        ["spec.dataset.format", "'messages'", "'alpaca'"],
    ),
    (
        "epochs and maxSteps",
        with_spec(training={"epochs": 1, "maxSteps": 10}),
        ["spec.training", "either training.epochs or training.maxSteps"],
    ),
    ("zero lora alpha", with_spec(lora={"alpha": 0}), ["spec.lora.alpha", "greater than 0"]),
    ("zero rank", with_spec(lora={"r": 0}), ["spec.lora.r", "greater than or equal to 1"]),
    ("dropout of one", with_spec(lora={"dropout": 1.0}), ["spec.lora.dropout", "less than 1"]),
    (
        "negative learning rate",
        with_spec(training={"learningRate": -1e-4}),
        ["spec.training.learningRate", "greater than 0"],
    ),
    (
        "batch not a multiple of micro batch",
        with_spec(training={"batchSize": 10, "microBatchSize": 4}),
        ["training.batchSize (10)", "training.microBatchSize (4)"],
    ),
    (
        "inconsistent accumulation",
        with_spec(training={"batchSize": 16, "microBatchSize": 4, "gradientAccumulationSteps": 2}),
        ["training.microBatchSize (4)", "gradientAccumulationSteps (2)", "training.batchSize (16)"],
    ),
    (
        "unsupported model scheme",
        with_spec(model={"uri": "ftp://host/model"}),
        ["spec.model.uri", "'ftp'", "pvc://"],
    ),
    (
        "pvc uri without claim",
        with_spec(dataset={"uri": "pvc:///train.jsonl"}),
        ["spec.dataset.uri", "pvc://<claim-name>/<path>"],
    ),
    (
        "output to https",
        with_spec(output={"uri": "https://example.org/out"}),
        ["spec.output.uri", "'https'"],
    ),
    (
        "eval split and fraction",
        with_spec(dataset={"uri": "d", "evalSplit": "test", "evalFraction": 0.1}),
        ["spec.dataset", "evalSplit or dataset.evalFraction"],
    ),
    (
        "eval fraction too large",
        with_spec(dataset={"uri": "d", "evalFraction": 0.9}),
        ["spec.dataset.evalFraction", "less than or equal to 0.5"],
    ),
    (
        "too many gpus",
        with_spec(resources={"gpus": 8}),
        ["spec.resources.gpus", "less than or equal to 1"],
    ),
    (
        "memory not a quantity",
        with_spec(resources={"memory": "lots"}),
        ["spec.resources.memory", "not a Kubernetes quantity"],
    ),
    (
        "bad toleration operator",
        with_spec(scheduling={"tolerations": [{"key": "k", "operator": "In"}]}),
        ["spec.scheduling.tolerations[0].operator", "'Exists'"],
    ),
    (
        "secret name not a k8s name",
        with_spec(model={"uri": "m", "tokenSecretRef": {"name": "HF Token"}}),
        ["spec.model.tokenSecretRef.name", "pattern"],
    ),
    (
        "hub push without token",
        with_spec(output={"uri": "pvc://a/b", "pushToHub": {"repoId": "me/x"}}),
        ["spec.output.pushToHub.tokenSecretRef", "required"],
    ),
    ("wrong kind", {**MINIMAL, "kind": "TrainJob"}, ["kind: must be FineTuneJob"]),
    (
        "wrong apiVersion",
        {**MINIMAL, "apiVersion": "kubetune.io/v1"},
        ["apiVersion: must be kubetune.io/v1alpha1"],
    ),
]


@pytest.mark.parametrize(
    ("manifest", "expected"), [(m, e) for _, m, e in INVALID], ids=[n for n, _, _ in INVALID]
)
def test_invalid_manifest_is_rejected_naming_the_field(
    manifest: dict[str, Any], expected: list[str]
) -> None:
    full = manifest if "apiVersion" in manifest else {**MINIMAL, **manifest}
    with pytest.raises(SpecError) as caught:
        load_finetunejob(full)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_manifest_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"job\.yaml is not valid YAML"):
        load_finetunejob(path)


def test_trainer_config_round_trips(tmp_path: Path) -> None:
    spec = load_finetunejob(SEED).spec
    config = TrainerConfig.model_validate(
        {"spec": spec.model_dump(by_alias=True), "job": {"name": "j", "namespace": "n"}}
    )
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_trainer_config(path) == config


def test_invalid_trainer_config_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"spec": {**MINIMAL["spec"], "lora": {"r": -1}}}))
    with pytest.raises(ConfigError, match=r"spec\.lora\.r"):
        load_trainer_config(path)
