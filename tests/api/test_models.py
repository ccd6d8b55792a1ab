"""The FineTuneJob API as a user meets it: defaults that keep manifests short, and errors that
name the field, say what was wrong and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cases import INVALID, MINIMAL, with_spec

from kubetune.api.config import TrainerConfig, load_trainer_config
from kubetune.api.errors import ConfigError, SpecError
from kubetune.api.manifest import load_finetunejob
from kubetune.api.models import plan_training

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "llama2-qlora.yaml"


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
    plan = plan_training(load_finetunejob(MINIMAL).spec.training, ranks=1)
    assert plan.epochs == 3
    assert plan.max_steps is None
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (4, 4)


def test_training_plan_honours_explicit_micro_batch() -> None:
    spec = load_finetunejob(with_spec(training={"batchSize": 16, "microBatchSize": 2})).spec
    plan = plan_training(spec.training, ranks=1)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (2, 8)


def test_quantities_accept_numbers_and_strings() -> None:
    spec = load_finetunejob(with_spec(resources={"cpu": 4, "memory": "16Gi"})).spec
    assert (spec.resources.cpu, spec.resources.memory) == ("4", "16Gi")


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


# --- hostile documents -------------------------------------------------------------------------

ALIAS_BOMB = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: bomb}
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
spec:
  model: {uri: org/model}
  dataset: {uri: pvc://data/d.jsonl}
  output: {uri: pvc://out/a}
  podTemplate: {spec: {affinity: *g}}
"""


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(SpecError, match="more than 100000 values"):
        load_finetunejob(path)


def test_a_deeply_nested_manifest_is_refused(tmp_path: Path) -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    manifest = {**MINIMAL, "spec": {**MINIMAL["spec"], "podTemplate": {"spec": deep}}}
    with pytest.raises(SpecError, match="nested more than 64 levels"):
        load_finetunejob(manifest)


def test_a_trainer_config_alias_bomb_is_an_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(ALIAS_BOMB.replace("kind: FineTuneJob", "kind: TrainerConfig"))
    with pytest.raises(ConfigError, match="more than 100000 values"):
        load_trainer_config(path)
