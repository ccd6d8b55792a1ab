"""The QLoRA SFT recipe: one class that checks, sets up, trains and saves.

Shaped like torchtune's single-device LoRA recipe: the constructor validates (it reads no file
and imports nothing heavy); ``setup`` resolves the speed settings for this node, claims the
output location, reads the data first (cheap, and the commonest failure) and loads the 4-bit
model second; ``train`` runs TRL's SFTTrainer, checkpointing every N steps and on SIGTERM and
resuming from the newest checkpoint; ``save`` hands the adapter to the publisher. The trainer's
arguments come from :func:`~kubetune.trainer.arguments.sft_arguments`, checkpoints are
:mod:`~kubetune.trainer.checkpoints`' and :mod:`~kubetune.trainer.resume`'s, and the files a run
leaves behind are :mod:`~kubetune.trainer.publishing`'s.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import Reason
from kubetune.api.models import (
    BaseModelRef,
    EvaluationResult,
    MemoryPlanReport,
    TrainerResult,
    plan_training,
)
from kubetune.api.uris import OUTPUT_SCHEMES, display_uri
from kubetune.trainer import locations, outputs
from kubetune.trainer.arguments import LossMasking, sft_arguments
from kubetune.trainer.checkpoints import (
    CHECKPOINTS_DIR,
    PreemptionGuard,
    RemoteCheckpoints,
    checkpoint_callback,
    checkpoint_step,
    claim,
    newest_checkpoint,
    run_identity,
)
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig, OutOfMemory, first_line
from kubetune.trainer.progress import (
    ProgressReporter,
    ProgressTracker,
    RateLimitedReporter,
    make_progress_callback,
    reporter_from_settings,
)
from kubetune.trainer.publishing import Publication, Publisher
from kubetune.trainer.secrets import HubTokens

if TYPE_CHECKING:
    from kubetune.trainer.data import PreparedData
    from kubetune.trainer.memory import MemoryPlan
    from kubetune.trainer.speed import SpeedSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    preempted: bool
    resumed_from_step: int | None
    global_step: int
    metrics: dict[str, float]


def _keep_compiled_kernels(directory: Path) -> None:
    """Compiled kernels (flex attention's, Liger's) under kubetune's cache, where the next run on
    the node, or the next attempt, finds them (on an H200 the first step took 67 s with cold
    caches and 14 s with warm ones, docs/trainer.md). Settings already in the environment win."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))


class QLoRASFTRecipe:
    """One training run of a resolved TrainerConfig."""

    def __init__(
        self,
        config: TrainerConfig,
        *,
        tokens: HubTokens | None = None,
        name: str = "adapter",
        progress_bar: bool = False,
        reporter: ProgressReporter | None = None,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.name = name
        self.progress_bar = progress_bar
        self.tokens = tokens or HubTokens()
        try:
            self.plan = plan_training(self.spec.training, self.spec.resources.gpus)
        except ValueError as exc:
            raise InvalidConfig(str(exc)) from None
        try:
            self.output = locations.resolve(self.spec.output.uri, OUTPUT_SCHEMES, "output")
        except ValueError as exc:
            raise InvalidConfig(f"output.uri: {exc}") from None
        if self.output.is_local:
            assert self.output.path is not None
            self.output_dir = self.output.path
            self.remote: RemoteCheckpoints | None = None
        else:
            # Object stores are written through a local staging copy, uploaded as it changes;
            # its path shows in messages, so it is named without the URI's credentials.
            staging = display_uri(self.spec.output.uri).replace("://", "/")
            self.output_dir = locations.cache_root() / "output" / staging
            self.remote = RemoteCheckpoints(self.spec.output.uri, self.output_dir / CHECKPOINTS_DIR)
        self.checkpoint_dir = self.output_dir / CHECKPOINTS_DIR
        self.metrics_file = self.output_dir / outputs.METRICS_FILE
        inner = reporter or reporter_from_settings(config.progress, config.job)
        self.reporter = RateLimitedReporter(inner, config.progress.interval_seconds)
        self.tracker = ProgressTracker(self.reporter, self.metrics_file)
        self.preemption = PreemptionGuard()
        self.data: PreparedData | None = None
        self.speed: SpeedSettings | None = None
        self.memory: MemoryPlan | None = None
        self.cuda = False
        self._trainer: Any = None
        self._tokenizer: Any = None

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        _keep_compiled_kernels(locations.cache_root() / "compiled")
        import torch

        from kubetune.trainer.speed import resolve_speed

        self.cuda = torch.cuda.is_available()
        self.speed = resolve_speed(self.spec.training, self.cuda)
        self._setup_output()
        if self.remote is not None:
            self.remote.pull()
        located = self._setup_tokenizer()
        self._setup_memory_plan(located)
        self._setup_data()
        self._setup_model(located)

    def _setup_output(self) -> None:
        """A writable output location that holds no other run's work (see checkpoints.claim)."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.output_dir, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise InvalidConfig(
                f"output location {self.output_dir} is not writable (output.uri "
                f"{display_uri(self.spec.output.uri)}): {exc.strerror}"
            ) from None
        if self.output.is_local:
            finished = (self.output_dir / outputs.ADAPTER_WEIGHTS).exists()
            claim(self.checkpoint_dir, run_identity(self.config), self.spec.output.uri, finished)

    def _setup_tokenizer(self) -> tuple[str, bool]:
        from kubetune.trainer.modeling import load_tokenizer, locate_model

        source, is_hub = locate_model(self.spec.model)
        self._tokenizer = load_tokenizer(
            source, self.spec.model, is_hub, self.tokens.read, self.spec.dataset.chat_template
        )
        return source, is_hub

    def _setup_memory_plan(self, located: tuple[str, bool]) -> None:
        """Checkpointing, tokens per micro-step and optimizer for this model on this card's free
        memory (kubetune.trainer.memory), printed now and reported in result.json."""
        import torch

        from kubetune.trainer.memory import GIB, MemoryPlan, RunSettings, plan_memory
        from kubetune.trainer.modeling import model_shape
        from kubetune.trainer.speed import apply_plan

        assert self.speed is not None
        training = self.spec.training
        per_device = self.plan.micro_batch_size * self.plan.gradient_accumulation_steps
        chosen = (
            training.micro_batch_size is not None
            or training.gradient_accumulation_steps is not None
        )
        run = RunSettings(
            max_length=training.max_length,
            per_device_batch=per_device,
            lora_rank=self.spec.lora.r,
            lora_dropout=self.spec.lora.dropout,
            liger_kernel=self.speed.liger_kernel,
            micro_batch_size=self.plan.micro_batch_size if chosen else None,
            gradient_checkpointing=training.gradient_checkpointing,
            optimizer=training.optimizer,
        )
        source, is_hub = located
        shape = model_shape(source, self.spec.model, is_hub, self.tokens.read)
        free = int(torch.cuda.mem_get_info()[0]) if self.cuda else None
        if shape is not None:
            memory = plan_memory(shape, run, free, cuda=self.cuda)
        else:  # an unknown shape: what the spec says; on a GPU, checkpointing when unset
            checkpointing = training.gradient_checkpointing
            if checkpointing is None:
                checkpointing = self.cuda
            micro = self.plan.micro_batch_size
            memory = MemoryPlan(
                checkpointed_layers=1 if checkpointing else 0,
                layers=1,
                micro_batch_size=micro,
                tokens_per_micro_step=micro * training.max_length,
                optimizer=self.speed.optimizer,
                estimated_peak_bytes=None,
                free_bytes=free,
            )
        if not memory.fits and memory.estimated_peak_bytes and free:
            message = (
                f"this run needs about {memory.estimated_peak_bytes / GIB:.1f} GiB of GPU memory "
                f"at its leanest ({memory.summary()}); the GPU has {free / GIB:.1f} GiB free"
            )
            if memory.estimated_peak_bytes > free:
                knob = f"training.maxLength (now {training.max_length})"
                raise OutOfMemory(f"{message}; lower {knob} or use a larger GPU")
            log.warning("%s: it may not fit", message)
        self.memory = memory
        self.speed = apply_plan(self.speed, memory)
        self.plan = self.plan.model_copy(
            update={
                "micro_batch_size": memory.micro_batch_size,
                "gradient_accumulation_steps": per_device // memory.micro_batch_size,
            }
        )
        log.info("memory plan: %s", memory.summary())

    def plan_report(self) -> MemoryPlanReport | None:
        """The memory plan as result.json and the status show it."""
        if self.memory is None:
            return None
        memory = self.memory
        peak = None
        if self.cuda:
            import torch

            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        estimated, free = memory.estimated_peak_bytes, memory.free_bytes
        return MemoryPlanReport(
            gradient_checkpointing=memory.describe_checkpointing(),
            micro_batch_size=self.plan.micro_batch_size,
            tokens_per_micro_step=memory.tokens_per_micro_step,
            gradient_accumulation_steps=self.plan.gradient_accumulation_steps,
            optimizer=memory.optimizer,
            estimated_peak_gib=round(estimated / 2**30, 2) if estimated is not None else None,
            free_gib=round(free / 2**30, 2) if free is not None else None,
            peak_gib=peak,
        )

    def _setup_data(self) -> None:
        from kubetune.trainer.data import prepare

        self.data = prepare(
            self.spec.dataset,
            chat_template=self._tokenizer.chat_template,
            seed=self.spec.training.seed,
            token=self.tokens.read,
        )

    def _setup_model(self, located: tuple[str, bool]) -> None:
        from trl import SFTConfig

        from kubetune.trainer.divergence import divergence_callback
        from kubetune.trainer.modeling import (
            check_lora_targets,
            load_quantized_model,
            lora_config,
            partial_checkpointing_callback,
        )
        from kubetune.trainer.resume import resumable_sft_trainer

        assert self.data is not None and self.speed is not None
        source, is_hub = located
        model = load_quantized_model(
            source,
            spec=self.spec.model,
            quantization=self.spec.quantization,
            speed=self.speed,
            is_hub=is_hub,
            token=self.tokens.read,
            cuda=self.cuda,
        )
        check_lora_targets(model, self.spec.lora)
        masking = LossMasking(
            completion_only=self.data.completion_only_loss,
            assistant_only=self.data.assistant_only_loss,
            has_eval=self.data.eval is not None,
        )
        arguments = sft_arguments(
            self.spec,
            self.plan,
            self.speed,
            cuda=self.cuda,
            checkpoint_dir=str(self.checkpoint_dir),
            masking=masking,
            progress_bar=self.progress_bar,
        )
        after_save = self.remote.push_newest if self.remote is not None else lambda: None
        sft_config = SFTConfig(**arguments)
        self._check_optimizer_runs_here(sft_config, model)
        self._trainer = resumable_sft_trainer(
            model=model,
            args=sft_config,
            train_dataset=self.data.train,
            eval_dataset=self.data.eval,
            processing_class=self._tokenizer,
            peft_config=lora_config(self.spec.lora),
            callbacks=[
                make_progress_callback(self.tracker),
                checkpoint_callback(self.preemption, after_save),
            ],
        )
        trainer = self._trainer
        if self.speed.gradient_checkpointing and self.speed.checkpointed_layers is not None:
            trainer.add_callback(partial_checkpointing_callback(self.speed.checkpointed_layers))
        trainer.add_callback(
            divergence_callback(self.spec, lambda: getattr(trainer, "_tr_loss", None))
        )
        if len(self._trainer.train_dataset) == 0:
            # TRL drops examples whose completion was truncated away; none left is a data problem.
            raise DatasetUnusable(
                f"no training example keeps a completion token within training.maxLength "
                f"({self.spec.training.max_length}); raise it or shorten the prompts"
            )

    def _check_optimizer_runs_here(self, sft_config: Any, model: Any) -> None:
        """A known optimizer whose package is missing (or that needs settings kubetune doesn't
        pass) is a config problem, found before the first step rather than at it."""
        from trl import SFTTrainer

        try:
            SFTTrainer.get_optimizer_cls_and_kwargs(sft_config, model)
        except (ImportError, ValueError, RuntimeError) as exc:
            assert self.speed is not None
            raise InvalidConfig(
                f"spec.training.optimizer: {self.speed.optimizer} can't be used here: "
                f"{first_line(exc)}"
            ) from None

    # --- train -------------------------------------------------------------------------------

    def train(self) -> TrainOutcome:
        import torch

        assert self._trainer is not None, "call setup() first"
        resume = newest_checkpoint(self.checkpoint_dir)
        if resume is not None:
            log.info("resuming from %s (step %d)", resume, checkpoint_step(resume))
            # Steps logged after that checkpoint by the attempt that stopped are logged again.
            outputs.forget_metrics_after(self.metrics_file, checkpoint_step(resume))
        self.preemption.install()
        try:
            if self.preemption.requested:
                return TrainOutcome(True, None, 0, {})
            output = self._trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(self._oom_advice()) from None
        finally:
            self.preemption.uninstall()
        metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
        return TrainOutcome(
            preempted=self.preemption.requested,
            resumed_from_step=checkpoint_step(resume) if resume else None,
            global_step=self._trainer.state.global_step,
            metrics=metrics,
        )

    def _oom_advice(self) -> str:
        training = self.spec.training
        knobs = [
            f"training.microBatchSize (now {self.plan.micro_batch_size}; batchSize is kept by "
            "accumulation)",
            f"training.maxLength (now {training.max_length})",
        ]
        speed = self.speed
        if speed is None or not speed.gradient_checkpointing or speed.checkpointed_layers:
            knobs.insert(0, "training.gradientCheckpointing: true")
        return "out of GPU memory; lower " + ", or ".join(knobs)

    # --- save --------------------------------------------------------------------------------

    def save(self, outcome: TrainOutcome) -> Publication:
        """The adapter, then (each on its own: a failure there keeps the adapter) the held-out
        loss, the evaluation prompts, the files that describe it and its delivery."""
        assert self._trainer is not None and self.data is not None
        publisher = Publisher(
            name=self.name,
            spec=self.spec,
            output=self.output,
            output_dir=self.output_dir,
            tokens=self.tokens,
        )
        adapter = publisher.save_adapter(self._trainer.model, self._tokenizer)
        metrics = self._final_metrics(outcome)
        if self.data.eval is not None:
            eval_loss = publisher.attempt("held-out evaluation", self._eval_loss)
            if eval_loss is not None:
                metrics["eval_loss"] = eval_loss
        evaluation = None
        if self.spec.evaluation is not None and self.spec.evaluation.prompts:
            evaluation = publisher.attempt("evaluation prompts", self._evaluate)
        result = TrainerResult(
            outcome="Succeeded",
            reason=Reason.SUCCEEDED,
            message=(
                f"adapter written to {display_uri(self.spec.output.uri)} after "
                f"{outcome.global_step} steps"
            ),
            adapter=adapter,
            base_model=BaseModelRef(
                uri=display_uri(self.spec.model.uri), revision=self.spec.model.revision
            ),
            dataset_fingerprint=self.data.fingerprint,
            metrics=metrics,
            evaluation=evaluation,
            plan=self.plan_report(),
        )
        return publisher.publish(result, self._effective_settings(outcome), self.metrics_file)

    def _final_metrics(self, outcome: TrainOutcome) -> dict[str, float]:
        """The run's metrics, over every attempt: the Trainer's train_loss already is (resume
        restores its running totals); its runtime and throughput are this attempt's, and are
        extended here by the training time the checkpoint carries."""
        metrics = {"steps": float(outcome.global_step)}
        if outcome.resumed_from_step is not None:
            # A preempted run says where it picked up, so a retried pod is seen to continue.
            metrics["resumed_from_step"] = float(outcome.resumed_from_step)
        trained = outcome.metrics
        if "train_loss" in trained:
            metrics["train_loss"] = round(trained["train_loss"], 6)
        if "train_runtime" in trained:
            attempt = trained["train_runtime"]
            runtime = self._trainer.earlier_train_seconds + attempt
            metrics["train_runtime"] = round(runtime, 6)
            if "train_samples_per_second" in trained and runtime > 0:
                samples = trained["train_samples_per_second"] * attempt
                metrics["train_samples_per_second"] = round(samples / runtime, 6)
        if self.tracker.loss is not None:
            metrics["final_loss"] = self.tracker.loss
        if self.tracker.tokens_per_second is not None:
            metrics["tokens_per_second"] = self.tracker.tokens_per_second
        return metrics

    def _eval_loss(self) -> float:
        return round(float(self._trainer.evaluate()["eval_loss"]), 6)

    def _evaluate(self) -> EvaluationResult:
        from kubetune.trainer.evaluation import compare_base_and_adapter

        evaluation = self.spec.evaluation
        assert evaluation is not None and self.data is not None
        samples = compare_base_and_adapter(
            self._trainer.model,
            self._tokenizer,
            list(evaluation.prompts),
            self.data.format,
            max_new_tokens=evaluation.max_new_tokens,
            # Generation runs in the precision training ran in.
            precision=self._trainer.accelerator.autocast,
        )
        return EvaluationResult(samples=samples)

    def _effective_settings(self, outcome: TrainOutcome) -> dict[str, Any]:
        assert self.speed is not None
        return {
            "steps": outcome.global_step,
            "micro batch x accumulation": (
                f"{self.plan.micro_batch_size} x {self.plan.gradient_accumulation_steps}"
            ),
            "attention": self.speed.attention,
            "packing (padding-free)": self.speed.packing,
            "liger kernel": self.speed.liger_kernel,
            "gradient checkpointing": (
                self.memory.describe_checkpointing()
                if self.memory is not None
                else self.speed.gradient_checkpointing
            ),
            "tokens per micro-step": self.memory.tokens_per_micro_step if self.memory else None,
            "padded to one shape": self.speed.pad_to_tokens is not None,
            "optimizer": self.speed.optimizer,
        }
