"""The QLoRA SFT recipe: one class that checks, sets up, trains and saves.

Shaped like torchtune's single-device LoRA recipe: the constructor validates (it reads no file and
imports nothing heavy); ``setup`` resolves the speed settings for this node, claims the output
location, reads the data first (cheap, and the commonest failure) and loads the 4-bit model second;
``train`` runs TRL's SFTTrainer, checkpointing every N steps and on SIGTERM and resuming from the
newest checkpoint; ``save`` hands the adapter to the publisher. The trainer's arguments come from
:func:`~kubetune.trainer.plan.arguments.sft_arguments`, checkpoints are
:mod:`~kubetune.trainer.run.checkpoints`' and :mod:`~kubetune.trainer.run.resume`'s, and the files
a run leaves behind are :mod:`~kubetune.trainer.publish.publishing`'s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import Reason
from kubetune.api.models import (
    BaseModelRef,
    EvaluationResult,
    MemoryPlanReport,
    TrainerResult,
)
from kubetune.api.uris import display_uri
from kubetune.trainer import locations
from kubetune.trainer.errors import OutOfMemory
from kubetune.trainer.plan.arguments import RunArguments
from kubetune.trainer.plan.resolve import training_plan
from kubetune.trainer.publish import outputs
from kubetune.trainer.publish.publishing import Publication, Publisher
from kubetune.trainer.publish.reporting import effective_settings, run_metrics
from kubetune.trainer.run.checkpoints import (
    PreemptionGuard,
    RemoteCheckpoints,
    checkpoint_callback,
    checkpoint_step,
    newest_checkpoint,
    run_identity,
)
from kubetune.trainer.run.distributed import Rank, any_rank, barrier, start_group
from kubetune.trainer.run.progress import (
    NoopReporter,
    ProgressReporter,
    ProgressTracker,
    RateLimitedReporter,
    make_progress_callback,
    reporter_from_settings,
)
from kubetune.trainer.run.tracking import MlflowRun, run_name, tracking_environment
from kubetune.trainer.run.working_output import claim_output, working_output
from kubetune.trainer.secrets import HubTokens, redact_text_files

if TYPE_CHECKING:
    from kubetune.trainer.dataset.formats import PreparedData
    from kubetune.trainer.model.starting_adapter import StartingAdapter
    from kubetune.trainer.plan.memory import MemoryPlan
    from kubetune.trainer.plan.speed import SpeedSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    preempted: bool
    resumed_from_step: int | None
    global_step: int
    metrics: dict[str, float]


def _keep_compiled_kernels(directory: Path) -> None:
    """Compiled kernels (flex attention's, Liger's) under kubetune's cache, where the next run on
    the node, or the next attempt, finds them (what that saves: docs/performance.md). Settings
    already in the environment win."""
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
        rank: Rank | None = None,
    ) -> None:
        self.config = config
        #: Of a group of ranks, rank 0 alone writes the output, the progress and the result.
        self.rank = rank or Rank()
        self.spec = config.spec
        self.name = name
        self.progress_bar = progress_bar
        self.tokens = tokens or HubTokens()
        self.plan = training_plan(self.spec)
        # Where the run writes: the output, or for an oci:// output its checkpointUri.
        self.working = working_output(self.spec)
        self.output = self.working.location
        self.output_dir = self.working.directory
        self.remote: RemoteCheckpoints | None = self.working.remote
        self.checkpoint_dir = self.working.checkpoint_dir
        self.metrics_file = self.output_dir / outputs.METRICS_FILE
        if self.rank.is_main:
            inner = reporter or reporter_from_settings(config.progress, config.job)
        else:
            inner = NoopReporter()
        self.reporter = RateLimitedReporter(inner, config.progress.interval_seconds)
        self.tracker = ProgressTracker(
            self.reporter, self.metrics_file if self.rank.is_main else None
        )
        self.preemption = PreemptionGuard()
        self.data: PreparedData | None = None
        self.speed: SpeedSettings | None = None
        self.memory: MemoryPlan | None = None
        self.cuda = False
        self._trainer: Any = None
        self._tokenizer: Any = None
        self.mlflow_run: MlflowRun | None = None
        #: spec.model.adapter, fetched and checked (setup).
        self.starting_adapter: StartingAdapter | None = None

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        _keep_compiled_kernels(locations.cache_root() / "compiled")
        import torch

        from kubetune.trainer.plan.resolve import node_speed

        # A pod that asks for no GPU, or a host that has none, trains on the CPU.
        self.cuda = torch.cuda.is_available() and self.spec.resources.gpus > 0
        start_group(self.rank, self.cuda)
        self.speed = node_speed(self.spec, self.cuda)
        if self.rank.is_main:
            claim_output(self.working, self.config)
        if self.remote is not None and self.rank.is_local_main:
            self.remote.pull()
        # The other ranks read the checkpoints rank 0 claimed (and each pod's first rank pulled).
        barrier(self.rank)
        self._setup_tracking()
        located = self._setup_tokenizer()
        self._setup_memory_plan(located)
        self._setup_data()
        self._setup_model(located)

    def _setup_tracking(self) -> None:
        """spec.tracking: the environment transformers' callbacks read, and (rank 0) the MLflow
        run, started now so that an unreachable server fails the run before the model loads."""
        os.environ.update(tracking_environment(self.spec, self.output_dir))
        tracking = self.spec.tracking
        if tracking is None or tracking.mlflow is None or not self.rank.is_main:
            return
        self.mlflow_run = MlflowRun(
            self.spec,
            identity=run_identity(self.config),
            name=run_name(self.spec, self.name) or self.name,
        )
        self.mlflow_run.start(resuming=newest_checkpoint(self.checkpoint_dir) is not None)

    def end_tracking(self, status: Literal["FINISHED", "FAILED", "KILLED"]) -> None:
        if self.mlflow_run is not None:
            self.mlflow_run.end(status)

    def _setup_tokenizer(self) -> tuple[str, bool]:
        from kubetune.trainer.model.modeling import load_tokenizer, locate_model

        source, is_hub = locate_model(self.spec.model)
        self._tokenizer = load_tokenizer(
            source, self.spec.model, is_hub, self.tokens.read, self.spec.dataset.chat_template
        )
        return source, is_hub

    def _setup_memory_plan(self, located: tuple[str, bool]) -> None:
        """Checkpointing, tokens per micro-step and optimizer for this model on this card's free
        memory (kubetune.trainer.plan.resolve), printed now and reported in result.json."""
        from kubetune.trainer.model.modeling import model_shape
        from kubetune.trainer.plan.resolve import fit_to_card

        assert self.speed is not None
        source, is_hub = located
        shape = model_shape(source, self.spec.model, is_hub, self.tokens.read)
        fitted = fit_to_card(self.spec, self.plan, self.speed, shape, cuda=self.cuda)
        self.memory, self.speed, self.plan = fitted.memory, fitted.speed, fitted.plan
        log.info("memory plan: %s", self.memory.summary())

    def plan_report(self) -> MemoryPlanReport | None:
        """The memory plan as result.json and the status show it."""
        from kubetune.trainer.plan.card import plan_report

        if self.memory is None:
            return None
        return plan_report(self.memory, self.plan, self.cuda)

    def _setup_data(self) -> None:
        from kubetune.trainer.dataset.formats import prepare

        self.data = prepare(
            self.spec.dataset,
            chat_template=self._tokenizer.chat_template,
            seed=self.spec.training.seed,
            token=self.tokens.read,
            method=self.spec.method.type,
        )

    def _setup_model(self, located: tuple[str, bool]) -> None:
        from kubetune.trainer.run import assembly

        assert self.data is not None and self.speed is not None
        loaded = assembly.load_model(
            self.spec, self.speed, located, token=self.tokens.read, cuda=self.cuda
        )
        self.starting_adapter = loaded.starting
        push = (
            self.remote.push_newest
            if self.remote is not None and self.rank.is_main
            else lambda: None
        )

        def after_save() -> None:
            # A checkpoint holds the tokenizer's files too: no secret they quote stays there.
            newest = newest_checkpoint(self.checkpoint_dir)
            if newest is not None and self.rank.is_main:
                redact_text_files(newest, self.tokens.secrets)
            push()

        common: dict[str, Any] = {
            "model": loaded.model,
            "train_dataset": self.data.train,
            "eval_dataset": self.data.eval,
            "processing_class": self._tokenizer,
            "peft_config": loaded.peft_config,
            "callbacks": [
                make_progress_callback(self.tracker),
                checkpoint_callback(self.preemption, after_save, self._stop_requested),
            ],
        }
        run = RunArguments(
            cuda=self.cuda,
            checkpoint_dir=str(self.checkpoint_dir),
            progress_bar=self.progress_bar,
            distributed=self.rank.distributed,
            run_name=run_name(self.spec, self.name),
        )
        self._trainer = assembly.trl_trainer(
            self.spec, self.plan, self.speed, self.data, run=run, common=common
        )
        assembly.finish_trainer(self._trainer, self.spec, self.speed)

    # --- train -------------------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        """Whether any rank of the group got SIGTERM: all of them then checkpoint this step."""
        return any_rank(self.rank, self.preemption.requested)

    def train(self) -> TrainOutcome:
        import torch

        assert self._trainer is not None, "call setup() first"
        resume = newest_checkpoint(self.checkpoint_dir)
        if resume is not None:
            log.info("resuming from %s (step %d)", resume, checkpoint_step(resume))
            if self.rank.is_main:
                # Steps logged after that checkpoint by the attempt that stopped are logged again.
                outputs.forget_metrics_after(self.metrics_file, checkpoint_step(resume))
        self.preemption.install()
        try:
            if self._stop_requested():
                return TrainOutcome(True, None, 0, {})
            output = self._trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(self._oom_advice()) from None
        finally:
            self.preemption.uninstall()
        metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
        return TrainOutcome(
            preempted=self._stop_requested(),
            resumed_from_step=checkpoint_step(resume) if resume else None,
            global_step=self._trainer.state.global_step,
            metrics=metrics,
        )

    def _oom_advice(self) -> str:
        training = self.spec.training
        lower = [
            f"training.microBatchSize (now {self.plan.micro_batch_size}; batchSize is kept by "
            "accumulation)",
            f"training.maxLength (now {training.max_length})",
        ]
        turn = []
        if training.profile == "speed":
            turn.append("training.profile: memory")
        speed = self.speed
        if speed is None or not speed.gradient_checkpointing or speed.checkpointed_layers:
            turn.append("training.gradientCheckpointing: true")
        advice = f"set {' or '.join(turn)}, or " if turn else ""
        return f"out of GPU memory; {advice}lower " + ", or ".join(lower)

    # --- save --------------------------------------------------------------------------------

    def save(self, outcome: TrainOutcome) -> Publication | None:
        """The held-out loss (every rank of a group takes part), then on rank 0 alone the
        adapter, and (each on its own: a failure there keeps the adapter) the evaluation
        prompts, the files that describe it and its delivery. None on the other ranks."""
        assert self._trainer is not None and self.data is not None
        publisher = Publisher(
            name=self.name,
            spec=self.spec,
            output=self.output,
            output_dir=self.output_dir,
            tokens=self.tokens,
            mlflow_run=self.mlflow_run,
        )
        held_out = None
        if self.data.eval is not None:
            held_out = publisher.attempt("held-out evaluation", self._held_out_metrics)
        if not self.rank.is_main:
            return None
        adapter = publisher.save_adapter(self._trainer.model, self._tokenizer)
        metrics = self._final_metrics(outcome)
        if held_out is not None:
            metrics.update(held_out)
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
                uri=display_uri(self.spec.model.uri),
                revision=self.spec.model.revision,
                adapter=self.starting_adapter.shown if self.starting_adapter else None,
            ),
            dataset_fingerprint=self.data.fingerprint,
            metrics=metrics,
            evaluation=evaluation,
            plan=self.plan_report(),
            tracking=self.mlflow_run.reference() if self.mlflow_run is not None else None,
        )
        return publisher.publish(result, self._effective_settings(outcome), self.metrics_file)

    def _final_metrics(self, outcome: TrainOutcome) -> dict[str, float]:
        tracker, earlier = self.tracker, self._trainer.earlier_train_seconds
        metrics = run_metrics(
            outcome.global_step, resumed_from_step=outcome.resumed_from_step,
            trained=outcome.metrics, earlier_train_seconds=earlier,
            final_loss=tracker.loss, tokens_per_second=tracker.tokens_per_second,
        )  # fmt: skip
        return {**metrics, **tracker.rewards}

    def _held_out_metrics(self) -> dict[str, float]:
        """The held-out loss, and for preference tuning the held-out reward metrics (the
        adapter's reward accuracy among them)."""
        from kubetune.trainer.run.preference import reward_metrics

        evaluated = self._trainer.evaluate()
        return {
            "eval_loss": round(float(evaluated["eval_loss"]), 6),
            **reward_metrics(evaluated, prefix="eval_"),
        }

    def _evaluate(self) -> EvaluationResult:
        from kubetune.trainer.run.evaluation import compare_base_and_adapter

        evaluation = self.spec.evaluation
        assert evaluation is not None and self.data is not None
        samples = compare_base_and_adapter(
            self._trainer.model,
            self._tokenizer,
            list(evaluation.prompts),
            self.data.prompt_format,
            max_new_tokens=evaluation.max_new_tokens,
            # Generation runs in the precision training ran in.
            precision=self._trainer.accelerator.autocast,
        )
        return EvaluationResult(samples=samples)

    def _effective_settings(self, outcome: TrainOutcome) -> dict[str, Any]:
        assert self.speed is not None
        return effective_settings(outcome.global_step, self.plan, self.speed, self.memory)
