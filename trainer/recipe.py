"""The QLoRA SFT recipe: one class that checks, sets up, trains and saves.

Shaped like torchtune's single-device LoRA recipe: the constructor refuses anything unsupported
before a GPU minute is spent; ``setup`` reads the data first (cheap, and the commonest failure)
and loads the 4-bit model second; ``train`` runs TRL's SFTTrainer, checkpointing every N steps
and on SIGTERM, resuming from the newest checkpoint; ``save`` writes the adapter and everything
that describes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kubetune.api.config import TrainerConfig
from kubetune.api.models import (
    AdapterRef,
    BaseModelRef,
    EvaluationResult,
    TrainerResult,
    plan_training,
)
from kubetune.trainer import locations, outputs
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig, OutOfMemory
from kubetune.trainer.progress import (
    ProgressReporter,
    ProgressTracker,
    RateLimitedReporter,
    make_progress_callback,
    reporter_from_settings,
)
from kubetune.trainer.secrets import PUSH_TOKEN_ENV, resolve_hub_token

if TYPE_CHECKING:
    from kubetune.trainer.data import PreparedData
    from kubetune.trainer.modeling import SpeedSettings

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
#: The newest checkpoint may be half-written when the pod was killed; keep the one before it.
CHECKPOINTS_KEPT = 2
#: Names the run that owns a checkpoints folder (see _claim_checkpoints).
RUN_MARKER = "run.json"


@dataclass(frozen=True)
class TrainOutcome:
    preempted: bool
    resumed_from_step: int | None
    global_step: int
    metrics: dict[str, float]


def newest_checkpoint(directory: Path) -> Path | None:
    """The highest-step checkpoint that was completely written (its trainer state is last)."""
    if not directory.is_dir():
        return None
    complete = [
        p
        for p in directory.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and (p / "trainer_state.json").is_file()
    ]
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


class PreemptionGuard:
    """Turns SIGTERM into "checkpoint now, then stop" instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM received: checkpointing after this step, then stopping")
        self.requested = True

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class QLoRASFTRecipe:
    """One training run of a resolved TrainerConfig."""

    def __init__(
        self,
        config: TrainerConfig,
        *,
        name: str = "adapter",
        progress_bar: bool = False,
        reporter: ProgressReporter | None = None,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.name = name
        self.progress_bar = progress_bar
        self.token = resolve_hub_token(config.token_file)
        try:
            self.plan = plan_training(self.spec.training, self.spec.resources.gpus)
        except ValueError as exc:
            raise InvalidConfig(str(exc)) from None
        self.output_uri = self.spec.output.uri
        try:
            self.output = locations.resolve(self.output_uri, hub_allowed=False)
        except ValueError as exc:
            raise InvalidConfig(f"output.uri: {exc}") from None
        self.output_dir = self._local_output_dir()
        self._check_output_writable()
        self.checkpoint_dir = self.output_dir / outputs.CHECKPOINTS_DIR
        self._claim_checkpoints()
        self.metrics_file = self.output_dir / outputs.METRICS_FILE
        inner = reporter or reporter_from_settings(config.progress, config.job)
        self.reporter = RateLimitedReporter(inner, config.progress.interval_seconds)
        self.preemption = PreemptionGuard()
        self.data: PreparedData | None = None
        self.speed: SpeedSettings | None = None
        self.cuda = False
        self._trainer: Any = None
        self._tokenizer: Any = None

    # --- fail fast ---------------------------------------------------------------------------

    def _local_output_dir(self) -> Path:
        if self.output.is_local:
            assert self.output.path is not None
            return self.output.path
        # Object stores are written through a local staging copy, uploaded as it changes.
        return locations.cache_root() / "output" / self.output_uri.replace("://", "/")

    def _check_output_writable(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.output_dir, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise InvalidConfig(
                f"output location {self.output_dir} is not writable (output.uri "
                f"{self.output_uri}): {exc.strerror}"
            ) from None

    def _run_identity(self) -> str:
        """Who may resume these checkpoints: the FineTuneJob (its uid survives pod retries), or
        for local runs the resolved spec itself."""
        if self.config.job is not None and self.config.job.uid:
            return f"finetunejob/{self.config.job.uid}"
        spec = self.spec.model_dump_json(by_alias=True, exclude_none=True)
        return "spec/" + hashlib.sha256(spec.encode()).hexdigest()[:16]

    def _claim_checkpoints(self) -> None:
        """Resume only our own checkpoints: a new job pointed at an old job's output would
        otherwise continue someone else's run, and then overwrite their adapter."""
        if not self.output.is_local:
            return
        marker = self.checkpoint_dir / RUN_MARKER
        identity = self._run_identity()
        owner = None
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads(marker.read_text(encoding="utf-8")).get("run")
        if owner is not None and owner != identity and newest_checkpoint(self.checkpoint_dir):
            raise InvalidConfig(
                f"output.uri {self.output_uri} already holds the checkpoints of another run "
                f"({owner}); use another output.uri, or remove {self.checkpoint_dir} to start over"
            )
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"run": identity}) + "\n", encoding="utf-8")

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        from kubetune.trainer.modeling import resolve_speed

        self.speed = resolve_speed(self.spec.training, self.cuda)
        self._pull_remote_checkpoints()
        tokenizer_source = self._setup_tokenizer()
        self._setup_data()
        self._setup_model(tokenizer_source)

    def _setup_tokenizer(self) -> tuple[str, bool]:
        from kubetune.trainer.modeling import load_tokenizer, locate_model

        source, is_hub = locate_model(self.spec.model)
        self._tokenizer = load_tokenizer(
            source, self.spec.model, is_hub, self.token, self.spec.dataset.chat_template
        )
        return source, is_hub

    def _setup_data(self) -> None:
        from kubetune.trainer.data import prepare

        self.data = prepare(
            self.spec.dataset,
            chat_template=self._tokenizer.chat_template,
            seed=self.spec.training.seed,
            token=self.token,
        )

    def _setup_model(self, located: tuple[str, bool]) -> None:
        from trl import SFTTrainer

        from kubetune.trainer.modeling import load_quantized_model, lora_config

        assert self.data is not None and self.speed is not None
        source, is_hub = located
        model = load_quantized_model(
            source,
            spec=self.spec.model,
            quantization=self.spec.quantization,
            speed=self.speed,
            is_hub=is_hub,
            token=self.token,
            cuda=self.cuda,
        )
        self.tracker = ProgressTracker(self.reporter, self.metrics_file)
        self._trainer = SFTTrainer(
            model=model,
            args=self._sft_config(),
            train_dataset=self.data.train,
            eval_dataset=self.data.eval,
            processing_class=self._tokenizer,
            peft_config=lora_config(self.spec.lora),
            callbacks=[make_progress_callback(self.tracker), self._preemption_callback()],
        )
        if len(self._trainer.train_dataset) == 0:
            # TRL drops examples whose completion was truncated away; none left is a data problem.
            raise DatasetUnusable(
                f"no training example keeps a completion token within training.maxLength "
                f"({self.spec.training.max_length}); raise it or shorten the prompts"
            )

    def _sft_config(self) -> Any:
        from trl import SFTConfig

        assert self.data is not None and self.speed is not None
        training = self.spec.training
        bf16 = self.spec.quantization.compute_dtype == "bfloat16"
        fp16 = self.spec.quantization.compute_dtype == "float16" and self.cuda
        has_eval = self.data.eval is not None
        return SFTConfig(
            output_dir=str(self.checkpoint_dir),
            num_train_epochs=self.plan.epochs if self.plan.epochs is not None else 1.0,
            max_steps=self.plan.max_steps if self.plan.max_steps is not None else -1,
            per_device_train_batch_size=self.plan.micro_batch_size,
            per_device_eval_batch_size=self.plan.micro_batch_size,
            gradient_accumulation_steps=self.plan.gradient_accumulation_steps,
            learning_rate=training.learning_rate,
            lr_scheduler_type=training.lr_scheduler,
            # transformers reads a float below 1 as a fraction of the run and 1.0 as one step.
            warmup_steps=min(training.warmup_ratio, 0.999),
            weight_decay=training.weight_decay,
            max_grad_norm=training.max_grad_norm,
            seed=training.seed,
            data_seed=training.seed,
            optim=self.speed.optimizer,
            bf16=bf16,
            fp16=fp16,
            use_cpu=not self.cuda,
            max_length=training.max_length,
            packing=self.speed.packing,
            padding_free=self.speed.packing,
            use_liger_kernel=self.speed.liger_kernel,
            gradient_checkpointing=self.speed.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            completion_only_loss=self.data.completion_only_loss,
            assistant_only_loss=self.data.assistant_only_loss,
            logging_steps=training.logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=training.checkpoint_steps,
            save_total_limit=CHECKPOINTS_KEPT,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=training.checkpoint_steps if has_eval else None,
            report_to=[],
            disable_tqdm=not self.progress_bar,
            dataloader_num_workers=0,
            dataset_num_proc=None,
        )

    def _preemption_callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self.preemption
        sync = self._push_checkpoints

        class PreemptionCallback(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                if guard.requested:
                    control.should_save = True
                    control.should_training_stop = True

            def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                sync()

        return PreemptionCallback()

    # --- checkpoints in object stores ----------------------------------------------------------

    def _pull_remote_checkpoints(self) -> None:
        if self.output.is_local:
            return
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.output_uri.rstrip("/") + "/checkpoints")
        try:
            if fs.exists(root):
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                fs.get(root.rstrip("/") + "/", str(self.checkpoint_dir), recursive=True)
        except Exception as exc:
            log.warning("could not fetch checkpoints from %s: %s", self.output_uri, exc)

    def _push_checkpoints(self) -> None:
        if self.output.is_local:
            return
        newest = newest_checkpoint(self.checkpoint_dir)
        if newest is None:
            return
        try:
            locations.upload_directory(
                newest, f"{self.output_uri.rstrip('/')}/checkpoints/{newest.name}"
            )
        except Exception as exc:
            log.warning("could not upload checkpoint %s: %s", newest.name, exc)

    # --- train -------------------------------------------------------------------------------

    def train(self) -> TrainOutcome:
        import torch

        assert self._trainer is not None, "call setup() first"
        resume = newest_checkpoint(self.checkpoint_dir)
        if resume is not None:
            log.info("resuming from %s (step %d)", resume, checkpoint_step(resume))
        self.preemption.install()
        try:
            if self.preemption.requested:
                return TrainOutcome(True, None, 0, {})
            output = self._trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(self._oom_advice()) from None
        finally:
            self.preemption.uninstall()
        state = self._trainer.state
        metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
        return TrainOutcome(
            preempted=self.preemption.requested,
            resumed_from_step=checkpoint_step(resume) if resume else None,
            global_step=state.global_step,
            metrics=metrics,
        )

    def _oom_advice(self) -> str:
        training = self.spec.training
        knobs = [
            f"training.microBatchSize (now {self.plan.micro_batch_size}; batchSize is kept by "
            "accumulation)",
            f"training.maxLength (now {training.max_length})",
        ]
        if not training.gradient_checkpointing:
            knobs.insert(0, "training.gradientCheckpointing: true")
        return "out of GPU memory; lower " + ", or ".join(knobs)

    # --- save --------------------------------------------------------------------------------

    def save(self, outcome: TrainOutcome) -> TrainerResult:
        """Adapter, tokenizer, model card, metrics, loss curve and result.json, then upload."""
        assert self._trainer is not None and self.data is not None and self.speed is not None
        started = time.monotonic()
        trainer = self._trainer
        trainer.model.save_pretrained(self.output_dir)
        self._tokenizer.save_pretrained(self.output_dir)
        weights = self.output_dir / outputs.ADAPTER_WEIGHTS
        metrics = self._final_metrics(outcome)
        evaluation = self._evaluate()
        result = TrainerResult(
            outcome="Succeeded",
            reason="Succeeded",
            message=f"adapter written to {self.output_uri} after {outcome.global_step} steps",
            adapter=AdapterRef(
                uri=self.output_uri,
                sha256=outputs.sha256_file(weights),
                size_bytes=weights.stat().st_size,
            ),
            base_model=BaseModelRef(uri=self.spec.model.uri, revision=self.spec.model.revision),
            dataset_fingerprint=self.data.fingerprint,
            metrics=metrics,
            evaluation=evaluation,
        )
        history = outputs.read_metrics(self.metrics_file)
        outputs.plot_loss_curve(history, self.output_dir / outputs.LOSS_CURVE_FILE, self.name)
        effective = {
            "steps": outcome.global_step,
            "micro batch x accumulation": (
                f"{self.plan.micro_batch_size} x {self.plan.gradient_accumulation_steps}"
            ),
            "attention": self.speed.attention,
            "packing (padding-free)": self.speed.packing,
            "liger kernel": self.speed.liger_kernel,
            "gradient checkpointing": self.speed.gradient_checkpointing,
            "optimizer": self.speed.optimizer,
        }
        card = outputs.model_card(self.name, self.spec, result, effective)
        (self.output_dir / "README.md").write_text(card, encoding="utf-8")
        if self.spec.output.merge:
            self._merge()
        outputs.write_result(self.output_dir, result)
        if not self.output.is_local:
            self._upload_final()
        if self.spec.output.push_to_hub is not None:
            self._push_to_hub()
        log.info("saved in %.1fs", time.monotonic() - started)
        return result

    def _final_metrics(self, outcome: TrainOutcome) -> dict[str, float]:
        metrics = {"steps": float(outcome.global_step)}
        if outcome.resumed_from_step is not None:
            # A preempted run says where it picked up, so a retried pod is seen to continue.
            metrics["resumed_from_step"] = float(outcome.resumed_from_step)
        for key in ("train_loss", "train_runtime", "train_samples_per_second"):
            if key in outcome.metrics:
                metrics[key] = round(outcome.metrics[key], 6)
        if self.tracker.loss is not None:
            metrics["final_loss"] = self.tracker.loss
        if self.tracker.tokens_per_second is not None:
            metrics["tokens_per_second"] = self.tracker.tokens_per_second
        if self.data is not None and self.data.eval is not None:
            evaluated = self._trainer.evaluate()
            if "eval_loss" in evaluated:
                metrics["eval_loss"] = round(float(evaluated["eval_loss"]), 6)
        return metrics

    def _evaluate(self) -> EvaluationResult | None:
        evaluation = self.spec.evaluation
        if evaluation is None or not evaluation.prompts:
            return None
        from kubetune.trainer.evaluation import compare_base_and_adapter

        assert self.data is not None
        samples = compare_base_and_adapter(
            self._trainer.model,
            self._tokenizer,
            list(evaluation.prompts),
            self.data.format,
            evaluation.max_new_tokens,
        )
        return EvaluationResult(samples=samples)

    def _merge(self) -> None:
        """Write base + adapter as one model in the compute dtype (not 4-bit: it is for serving)."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from kubetune.trainer.modeling import locate_model, torch_dtype

        source, is_hub = locate_model(self.spec.model)
        kwargs: dict[str, Any] = {"trust_remote_code": self.spec.model.trust_remote_code}
        if is_hub:
            kwargs.update(revision=self.spec.model.revision, token=self.token)
        base = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype(self.spec.quantization.compute_dtype), **kwargs
        )
        merged = PeftModel.from_pretrained(base, str(self.output_dir)).merge_and_unload()
        target = self.output_dir / "merged"
        merged.save_pretrained(target)
        self._tokenizer.save_pretrained(target)
        del base, merged
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _upload_final(self) -> None:
        staging = Path(tempfile.mkdtemp(prefix="kubetune-upload-"))
        try:
            for item in self.output_dir.iterdir():
                if item.name == outputs.CHECKPOINTS_DIR:
                    continue
                if item.is_dir():
                    shutil.copytree(item, staging / item.name)
                else:
                    shutil.copy2(item, staging / item.name)
            locations.upload_directory(staging, self.output_uri)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _push_to_hub(self) -> None:
        import os

        from huggingface_hub import HfApi

        push = self.spec.output.push_to_hub
        assert push is not None
        token = os.environ.get(PUSH_TOKEN_ENV) or self.token
        api = HfApi(token=token)
        api.create_repo(push.repo_id, private=push.private, exist_ok=True)
        api.upload_folder(
            repo_id=push.repo_id,
            folder_path=str(self.output_dir),
            ignore_patterns=[f"{outputs.CHECKPOINTS_DIR}/*", "merged/*", ".write-check-*"],
        )
