"""The spec → SFTConfig mapping, a pure function: every knob lands where TRL reads it."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from kubetune.api.models import FineTuneJobSpec, plan_training
from kubetune.trainer.plan.arguments import LossMasking, RunArguments, sft_arguments
from kubetune.trainer.plan.speed import SpeedSettings

pytestmark = pytest.mark.unit

PLAIN = SpeedSettings(
    attention="sdpa",
    liger_kernel=False,
    gradient_checkpointing=True,
    packing=True,
    optimizer="adamw_torch",
)
NO_EVAL = LossMasking(completion_only=True, assistant_only=False, has_eval=False)


def _spec(**overrides: Any) -> FineTuneJobSpec:
    training = {"batchSize": 16, "maxSteps": 40, **overrides.pop("training", {})}
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "meta-llama/Llama-2-7b-hf"},
            "dataset": {"uri": "pvc://data/support.jsonl"},
            "output": {"uri": "pvc://adapters/llama2-support"},
            "training": training,
            **overrides,
        }
    )


def _arguments(
    spec: FineTuneJobSpec,
    *,
    cuda: bool = False,
    speed: SpeedSettings = PLAIN,
    masking: LossMasking = NO_EVAL,
) -> dict[str, Any]:
    plan = plan_training(spec.training, spec.resources.world_size)
    run = RunArguments(cuda=cuda, checkpoint_dir="/out/checkpoints")
    return sft_arguments(spec, plan, speed, run, masking)


def test_the_effective_batch_is_micro_batches_times_accumulation() -> None:
    arguments = _arguments(_spec(training={"batchSize": 16, "microBatchSize": 4}))
    assert arguments["per_device_train_batch_size"] == 4
    assert arguments["gradient_accumulation_steps"] == 4


def test_max_steps_or_epochs_bound_the_run() -> None:
    by_steps = _arguments(_spec(training={"maxSteps": 40}))
    assert by_steps["max_steps"] == 40
    by_epochs = _arguments(_spec(training={"maxSteps": None, "epochs": 2}))
    assert by_epochs["max_steps"] == -1
    assert by_epochs["num_train_epochs"] == 2


@pytest.mark.parametrize(
    ("compute_dtype", "cuda", "bf16", "fp16"),
    [
        ("bfloat16", True, True, False),
        ("bfloat16", False, True, False),  # bf16 autocast runs on the CPU too
        ("float16", True, False, True),
        ("float16", False, False, False),  # fp16 autocast needs CUDA
        ("float32", True, False, False),
    ],
)
def test_mixed_precision_follows_the_compute_dtype_and_the_device(
    compute_dtype: str, cuda: bool, bf16: bool, fp16: bool
) -> None:
    spec = _spec(quantization={"computeDtype": compute_dtype})
    arguments = _arguments(spec, cuda=cuda)
    assert (arguments["bf16"], arguments["fp16"], arguments["use_cpu"]) == (bf16, fp16, not cuda)


def test_checkpoints_every_checkpoint_steps_keeping_the_two_newest() -> None:
    arguments = _arguments(_spec(training={"checkpointSteps": 25}))
    assert arguments["output_dir"] == "/out/checkpoints"
    assert (arguments["save_strategy"], arguments["save_steps"]) == ("steps", 25)
    assert arguments["save_total_limit"] == 2


def test_evaluation_runs_at_each_checkpoint_only_when_there_is_an_eval_split() -> None:
    spec = _spec(training={"checkpointSteps": 25})
    assert _arguments(spec)["eval_strategy"] == "no"
    with_eval = _arguments(spec, masking=LossMasking(True, False, has_eval=True))
    assert (with_eval["eval_strategy"], with_eval["eval_steps"]) == ("steps", 25)


def test_speed_settings_become_trl_flags() -> None:
    fast = SpeedSettings("flex_attention", True, False, True, "paged_adamw_8bit")
    arguments = _arguments(_spec(), cuda=True, speed=fast)
    assert arguments["optim"] == "paged_adamw_8bit"
    assert arguments["use_liger_kernel"] is True
    assert arguments["packing"] is arguments["padding_free"] is True
    assert arguments["gradient_checkpointing"] is False


def test_a_dpo_run_on_a_gpu_keeps_ligers_layer_kernels_and_pads_its_pairs() -> None:
    """TRL's DPOTrainer applies Liger's RMSNorm, SwiGLU and RoPE and keeps its own fused LM
    head; without them kubetune's DPO step was 1.85× TRL's hand-set one (docs/performance.md)."""
    from kubetune.trainer.plan.arguments import preference_arguments
    from kubetune.trainer.run.preference import preference_speed

    spec = _spec(method={"type": "dpo"})
    resolved = SpeedSettings("varlen", True, False, True, "paged_adamw_8bit")
    speed = preference_speed(resolved)
    assert (speed.liger_kernel, speed.packing, speed.attention) == (True, False, "varlen")
    flex = preference_speed(SpeedSettings("flex_attention", True, False, True, "adamw_torch"))
    assert flex.attention == "sdpa"
    plan = plan_training(spec.training, spec.resources.world_size)
    run = RunArguments(cuda=True, checkpoint_dir="/out/checkpoints")
    arguments = preference_arguments(spec, plan, speed, run, has_eval=False)
    assert arguments["use_liger_kernel"] is True
    assert "packing" not in arguments and arguments["pad_to_multiple_of"] is None
    off = preference_speed(SpeedSettings("sdpa", False, False, False, "adamw_torch"))
    assert off.liger_kernel is False


def test_loss_masking_comes_from_the_prepared_data() -> None:
    masking = LossMasking(completion_only=False, assistant_only=True, has_eval=False)
    arguments = _arguments(_spec(), masking=masking)
    assert arguments["completion_only_loss"] is False
    assert arguments["assistant_only_loss"] is True


def test_hyperparameters_pass_through_and_warmup_stays_a_fraction() -> None:
    training = {"learningRate": 5e-4, "warmupRatio": 1.0, "seed": 7, "lrScheduler": "cosine"}
    arguments = _arguments(_spec(training=training))
    assert arguments["learning_rate"] == 5e-4
    assert arguments["lr_scheduler_type"] == "cosine"
    assert arguments["seed"] == arguments["data_seed"] == 7
    assert arguments["warmup_steps"] < 1  # transformers reads 1.0 as one step, not the whole run


def test_the_mapping_imports_no_training_stack() -> None:
    probe = (
        "import sys\n"
        "import kubetune.trainer.plan.arguments\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_micro_steps_are_padded_to_the_plans_bucket() -> None:
    bucketed = SpeedSettings("flex_attention", True, False, True, "adamw_torch", pad_to_tokens=8192)
    assert _arguments(_spec(), cuda=True, speed=bucketed)["pad_to_multiple_of"] == 8192
    assert _arguments(_spec())["pad_to_multiple_of"] is None


def test_the_memory_profile_becomes_one_row_per_pass_all_checkpointed_and_8bit_adamw() -> None:
    from kubetune.trainer.plan.memory import GIB, RunSettings, plan_memory
    from kubetune.trainer.plan.shape import ModelShape
    from kubetune.trainer.plan.speed import apply_plan

    spec = _spec(training={"profile": "memory", "batchSize": 16})
    assert spec.training.profile == "memory"
    assert _spec().training.profile == "speed"
    plan = plan_training(spec.training, spec.resources.world_size)
    run = RunSettings(2048, 16, 16, 0.0, True, profile=spec.training.profile)
    memory = plan_memory(ModelShape(4096, 11008, 32, 32, 32, 32000), run, 22 * GIB, cuda=True)
    fast = SpeedSettings("flex_attention", True, False, True, "paged_adamw_8bit")
    arguments = sft_arguments(
        spec,
        plan.model_copy(update={"micro_batch_size": 1, "gradient_accumulation_steps": 16}),
        apply_plan(fast, memory),
        RunArguments(cuda=True, checkpoint_dir="/out/checkpoints"),
        NO_EVAL,
    )
    assert arguments["per_device_train_batch_size"] == 1
    assert arguments["gradient_accumulation_steps"] == 16
    assert arguments["gradient_checkpointing"] is True
    assert arguments["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert arguments["optim"] == "paged_adamw_8bit"
    assert arguments["use_liger_kernel"] is True  # the fused linear cross-entropy: no logits
    assert arguments["pad_to_multiple_of"] == 2048


def test_an_unknown_profile_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="profile"):
        _spec(training={"profile": "tiny"})


def test_tracking_reports_through_transformers_callbacks_configured_by_the_environment() -> None:
    from pathlib import Path

    from kubetune.trainer.run.tracking import tracking_environment

    assert _arguments(_spec())["report_to"] == []
    tracked = _spec(
        tracking={
            "mlflow": {"trackingUri": "https://mlflow.example.com", "experimentName": "bots"},
            "tensorboard": {"enabled": True},
        }
    )
    assert _arguments(tracked)["report_to"] == ["mlflow", "tensorboard"]
    environment = tracking_environment(tracked, Path("/out/run"))
    assert environment["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert environment["MLFLOW_EXPERIMENT_NAME"] == "bots"
    assert environment["TENSORBOARD_LOGGING_DIR"] == "/out/run/runs"
    off = _spec(tracking={"tensorboard": {"enabled": False}})
    assert _arguments(off)["report_to"] == []
    assert tracking_environment(off, Path("/out/run")) == {}


@pytest.mark.parametrize(
    ("packing", "cuda", "varlen_runs", "chosen"),
    [
        (True, True, True, "varlen"),  # packed on an Ampere-or-newer GPU: nothing to compile
        (True, True, False, "flex_attention"),  # an older GPU or torch < 2.10
        (False, True, True, "flex_attention"),  # padded batches have no sequence boundaries
        (True, False, False, "sdpa"),  # the CPU
    ],
)
def test_auto_attention_is_varlen_for_packed_sequences_where_the_gpu_runs_it(
    packing: bool, cuda: bool, varlen_runs: bool, chosen: str
) -> None:
    from kubetune.api.models import TrainingSpec
    from kubetune.trainer.plan.speed import resolve_speed

    training = TrainingSpec(packing=packing)
    assert resolve_speed(training, cuda, varlen_runs=varlen_runs).attention == chosen


@pytest.mark.parametrize(
    ("training", "cuda", "varlen_runs", "message"),
    [
        ({"attention": "varlen"}, False, False, "training.attention: varlen needs a CUDA GPU"),
        ({"attention": "varlen", "packing": False}, True, True, "set training.packing: true"),
        ({"attention": "varlen"}, True, False, "compute capability 8.0 or newer"),
    ],
)
def test_varlen_attention_where_it_cant_run_is_refused_naming_the_field(
    training: dict[str, Any], cuda: bool, varlen_runs: bool, message: str
) -> None:
    from kubetune.api.models import TrainingSpec
    from kubetune.trainer.errors import InvalidConfig
    from kubetune.trainer.plan.speed import resolve_speed

    with pytest.raises(InvalidConfig, match=message):
        resolve_speed(TrainingSpec.model_validate(training), cuda, varlen_runs=varlen_runs)


@pytest.mark.parametrize(
    ("setting", "cuda", "fp8_runs", "preference", "chosen"),
    [
        ("auto", True, True, False, True),  # a Hopper GPU, bf16 compute
        ("auto", False, False, False, False),  # the CPU
        ("auto", True, False, False, False),  # an older GPU, or a torch without row-wise FP8
        ("auto", True, True, True, False),  # DPO/KTO: the reference pass runs the base in bf16
        ("on", True, True, True, True),  # asked for: kept
        ("off", True, True, False, False),
    ],
)
def test_fp8_matmuls_auto_is_on_where_hopper_runs_them_and_off_elsewhere(
    setting: str, cuda: bool, fp8_runs: bool, preference: bool, chosen: bool
) -> None:
    from kubetune.api.models import QuantizationSpec
    from kubetune.trainer.plan.speed import FP8_AUTO, resolve_fp8

    assert FP8_AUTO is True  # what auto means until a GPU says otherwise
    quantization = QuantizationSpec(fp8_matmuls=setting)  # type: ignore[arg-type]
    assert resolve_fp8(quantization, cuda, fp8_runs=fp8_runs, preference=preference) == chosen


def test_fp8_matmuls_auto_means_off_once_its_switch_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.api.models import QuantizationSpec
    from kubetune.trainer.plan import speed

    monkeypatch.setattr(speed, "FP8_AUTO", False)
    assert not speed.resolve_fp8(QuantizationSpec(), True, fp8_runs=True, preference=False)
    on = QuantizationSpec(fp8_matmuls="on")
    assert speed.resolve_fp8(on, True, fp8_runs=True, preference=False)


def test_fp8_matmuls_on_this_cpu_resolve_off_or_are_refused_naming_the_field() -> None:
    """The node's own answer (no ``fp8_runs`` given): this machine has no Hopper GPU."""
    from kubetune.api.models import QuantizationSpec
    from kubetune.trainer.errors import InvalidConfig
    from kubetune.trainer.plan.resolve import node_speed
    from kubetune.trainer.plan.speed import resolve_fp8

    assert node_speed(_spec(), cuda=False).fp8_matmuls is False
    with pytest.raises(InvalidConfig, match=r"quantization\.fp8Matmuls: on needs a CUDA GPU"):
        node_speed(_spec(quantization={"fp8Matmuls": "on"}), cuda=False)
    on = QuantizationSpec(fp8_matmuls="on")
    with pytest.raises(InvalidConfig, match=r"compute capability 9\.0"):
        resolve_fp8(on, True, fp8_runs=False, preference=False)


def test_a_lora_dropout_keeps_the_base_in_bf16_and_refuses_fp8_on_naming_both_fields() -> None:
    """The FP8 matmuls run in the fused LoRA layer, which a layer with dropout doesn't take
    (PEFT's own forward): auto resolves off there rather than reporting FP8 it never ran."""
    from kubetune.api.models import QuantizationSpec
    from kubetune.trainer.errors import InvalidConfig
    from kubetune.trainer.plan.speed import resolve_fp8

    auto, on = QuantizationSpec(), QuantizationSpec(fp8_matmuls="on")
    assert resolve_fp8(auto, True, fp8_runs=True, preference=False, lora_dropout=0.0)
    assert not resolve_fp8(auto, True, fp8_runs=True, preference=False, lora_dropout=0.05)
    with pytest.raises(InvalidConfig, match=r"fp8Matmuls: on needs lora\.dropout: 0"):
        resolve_fp8(on, True, fp8_runs=True, preference=False, lora_dropout=0.05)


def test_fp8_matmuls_on_with_a_compute_dtype_other_than_bf16_is_refused_by_the_spec() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"fp8Matmuls: on needs quantization\.computeDtype"):
        _spec(quantization={"fp8Matmuls": "on", "computeDtype": "float16"})
    assert _spec(quantization={"computeDtype": "float16"}).quantization.fp8_matmuls == "auto"


def test_varlen_packed_micro_steps_are_not_padded_flex_ones_are() -> None:
    from kubetune.trainer.plan.memory import MemoryPlan
    from kubetune.trainer.plan.speed import apply_plan

    plan = MemoryPlan(checkpointed_layers=0, layers=32, micro_batch_size=4,
                      tokens_per_micro_step=8192, optimizer="adamw_torch_fused",
                      estimated_peak_bytes=None, free_bytes=None)  # fmt: skip
    varlen = SpeedSettings("varlen", True, False, True, "adamw_torch_fused")
    flex = SpeedSettings("flex_attention", True, False, True, "adamw_torch_fused")
    assert apply_plan(varlen, plan).pad_to_tokens is None
    assert apply_plan(flex, plan).pad_to_tokens == 8192


@pytest.mark.parametrize(
    ("reader", "environ", "line", "shown"),
    [
        pytest.param(
            "tracking_secrets",
            {
                "MLFLOW_TRACKING_USERNAME": "alice",
                "MLFLOW_TRACKING_PASSWORD": "p@ss word 1234",
                "MLFLOW_TRACKING_TOKEN": "mlflow-bearer-abcdef",
            },
            "auth p@ss word 1234 / p%40ss%20word%201234 / mlflow-bearer-abcdef for alice",
            "auth *** / *** / *** for alice",
            id="mlflow",
        ),
        pytest.param(
            "object_store_secrets",
            {
                "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID",
                "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
                "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLEsessiontoken",
            },
            "s3 error: key wJalrXUtnFEMI/K7MDENG/bPxRfiCY token FwoGZXIvYXdzEXAMPLEsessiontoken",
            "s3 error: key *** token ***",
            id="object-store",
        ),
    ],
)
def test_mlflow_and_object_store_secrets_are_redacted_like_the_hub_tokens(
    reader: str, environ: dict[str, str], line: str, shown: str
) -> None:
    from kubetune.trainer import secrets as secrets_module
    from kubetune.trainer.run import tracking
    from kubetune.trainer.secrets import HubTokens, redact

    read = getattr(tracking if reader == "tracking_secrets" else secrets_module, reader)
    secrets = HubTokens().with_secrets(read(environ)).secrets
    assert redact(line, secrets) == shown
