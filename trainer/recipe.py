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
import warnings
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
    plan_training,
)
from kubetune.api.uris import CHECKPOINT_SCHEMES, OUTPUT_SCHEMES, display_uri
from kubetune.trainer import locations, outputs
from kubetune.trainer.arguments import LossMasking, preference_arguments, sft_arguments
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
from kubetune.trainer.distributed import Rank, any_rank, barrier, start_group
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig, OutOfMemory
from kubetune.trainer.progress import (
    NoopReporter,
    ProgressReporter,
    ProgressTracker,
    RateLimitedReporter,
    make_progress_callback,
    reporter_from_settings,
)
from kubetune.trainer.publishing import Publication, Publisher
from kubetune.trainer.reporting import effective_settings, run_metrics
from kubetune.trainer.secrets import HubTokens, redact_text_files
from kubetune.trainer.tracking import MlflowRun, run_name, tracking_environment

if TYPE_CHECKING:
    from kubetune.trainer.data import PreparedData
    from kubetune.trainer.memory import MemoryPlan
    from kubetune.trainer.speed import SpeedSettings
    from kubetune.trainer.starting_adapter import StartingAdapter

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
        rank: Rank | None = None,
    ) -> None:
        self.config = config
        #: Of a group of ranks, rank 0 alone writes the output, the progress and the result.
        self.rank = rank or Rank()
        self.spec = config.spec
        self.name = name
        self.progress_bar = progress_bar
        self.tokens = tokens or HubTokens()
        try:
            self.plan = plan_training(self.spec.training, self.spec.resources.world_size)
        except ValueError as exc:
            raise InvalidConfig(str(exc)) from None
        # Where the run writes: the output, or for an oci:// output its checkpointUri (the
        # artifact is pushed from there once the adapter is saved).
        working = self.spec.output.working_uri
        field = "output.checkpointUri" if self.spec.output.is_oci else "output.uri"
        try:
            self.output = locations.resolve(
                working,
                CHECKPOINT_SCHEMES if self.spec.output.is_oci else OUTPUT_SCHEMES,
                "output",
            )
        except ValueError as exc:
            raise InvalidConfig(f"{field}: {exc}") from None
        if self.output.is_local:
            assert self.output.path is not None
            self.output_dir = self.output.path
            self.remote: RemoteCheckpoints | None = None
        else:
            # Object stores are written through a local staging copy, uploaded as it changes;
            # its path shows in messages, so it is named without the URI's credentials.
            staging = display_uri(working).replace("://", "/")
            self.output_dir = locations.cache_root() / "output" / staging
            self.remote = RemoteCheckpoints(working, self.output_dir / CHECKPOINTS_DIR)
        self.checkpoint_dir = self.output_dir / CHECKPOINTS_DIR
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

        from kubetune.trainer.speed import resolve_speed

        # A pod that asks for no GPU, or a host that has none, trains on the CPU.
        self.cuda = torch.cuda.is_available() and self.spec.resources.gpus > 0
        start_group(self.rank, self.cuda)
        self.speed = resolve_speed(self.spec.training, self.cuda)
        if self.spec.method.preference:
            from kubetune.trainer.preference import preference_speed

            self.speed = preference_speed(self.speed)
        if self.rank.is_main:
            self._setup_output()
        if self.remote is not None and self.rank.is_local_main:
            self.remote.pull()
        # The other ranks read the checkpoints rank 0 claimed (and each pod's first rank pulled).
        barrier(self.rank)
        self._setup_tracking()
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
            field = "output.checkpointUri" if self.spec.output.is_oci else "output.uri"
            raise InvalidConfig(
                f"output location {self.output_dir} is not writable ({field} "
                f"{display_uri(self.spec.output.working_uri)}): {exc.strerror}"
            ) from None
        if self.remote is not None:
            self.remote.claim(run_identity(self.config), outputs.ADAPTER_WEIGHTS)
        else:
            finished = (self.output_dir / outputs.ADAPTER_WEIGHTS).exists()
            claim(
                self.checkpoint_dir, run_identity(self.config), self.spec.output.working_uri,
                finished,
            )  # fmt: skip

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

    def _setup_starting_adapter(self, source: str, is_hub: bool) -> StartingAdapter:
        from kubetune.trainer.modeling import base_config
        from kubetune.trainer.starting_adapter import check_adapter, locate_adapter

        assert self.spec.model.adapter is not None
        adapter = locate_adapter(self.spec.model.adapter, self.tokens.read)
        config = base_config(source, self.spec.model, is_hub, self.tokens.read)
        check_adapter(adapter, self.spec, config)
        return adapter

    def _setup_tokenizer(self) -> tuple[str, bool]:
        from kubetune.trainer.modeling import load_tokenizer, locate_model

        source, is_hub = locate_model(self.spec.model)
        self._tokenizer = load_tokenizer(
            source, self.spec.model, is_hub, self.tokens.read, self.spec.dataset.chat_template
        )
        return source, is_hub

    def _setup_memory_plan(self, located: tuple[str, bool]) -> None:
        """Checkpointing, tokens per micro-step and optimizer for this model on this card's free
        memory (kubetune.trainer.planning), printed now and reported in result.json."""
        from kubetune.trainer.modeling import model_shape
        from kubetune.trainer.planning import plan_for_this_card
        from kubetune.trainer.speed import apply_plan

        assert self.speed is not None
        source, is_hub = located
        shape = model_shape(source, self.spec.model, is_hub, self.tokens.read)
        self.memory = plan_for_this_card(self.spec, self.plan, self.speed, shape, self.cuda)
        self.speed = apply_plan(self.speed, self.memory)
        per_device = self.plan.micro_batch_size * self.plan.gradient_accumulation_steps
        self.plan = self.plan.model_copy(
            update={
                "micro_batch_size": self.memory.micro_batch_size,
                "gradient_accumulation_steps": per_device // self.memory.micro_batch_size,
            }
        )
        log.info("memory plan: %s", self.memory.summary())

    def plan_report(self) -> MemoryPlanReport | None:
        """The memory plan as result.json and the status show it."""
        from kubetune.trainer.planning import plan_report

        if self.memory is None:
            return None
        return plan_report(self.memory, self.plan, self.cuda)

    def _setup_data(self) -> None:
        from kubetune.trainer.data import prepare

        self.data = prepare(
            self.spec.dataset,
            chat_template=self._tokenizer.chat_template,
            seed=self.spec.training.seed,
            token=self.tokens.read,
            method=self.spec.method.type,
        )

    def _setup_model(self, located: tuple[str, bool]) -> None:
        from trl import SFTConfig

        from kubetune.trainer.divergence import divergence_callback
        from kubetune.trainer.fused_lora import fuse_lora_layers
        from kubetune.trainer.modeling import (
            check_lora_targets,
            check_optimizer_runs_here,
            load_quantized_model,
            lora_config,
            offload_checkpoints_to_cpu,
            partial_checkpointing_callback,
        )
        from kubetune.trainer.resume import resumable_sft_trainer

        assert self.data is not None and self.speed is not None
        source, is_hub = located
        if self.spec.model.adapter is not None:
            # Fetched and checked before the weights load: a wrong adapter costs no model load.
            self.starting_adapter = self._setup_starting_adapter(source, is_hub)
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
        peft_config: Any = lora_config(self.spec.lora)
        if self.starting_adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(
                model, str(self.starting_adapter.path), is_trainable=True
            )
            peft_config = None
            log.info("continuing the adapter %s", self.starting_adapter.shown)
        if self.speed.offload_checkpoints:
            offload_checkpoints_to_cpu(model, pin_memory=self.cuda)
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
            "model": model,
            "train_dataset": self.data.train,
            "eval_dataset": self.data.eval,
            "processing_class": self._tokenizer,
            "peft_config": peft_config,
            "callbacks": [
                make_progress_callback(self.tracker),
                checkpoint_callback(self.preemption, after_save, self._stop_requested),
            ],
        }
        if self.spec.method.preference:
            self._trainer = self._preference_trainer(model, common)
        else:
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
                distributed=self.rank.distributed,
                run_name=run_name(self.spec, self.name),
            )
            sft_config = SFTConfig(**arguments)
            check_optimizer_runs_here(sft_config, model, self.speed.optimizer)
            self._trainer = resumable_sft_trainer(args=sft_config, **common)
        trainer = self._trainer
        fused = fuse_lora_layers(trainer.model)
        if fused:
            log.info("%d adapted 4-bit layers compute base and LoRA in one function", fused)
        if self.speed.gradient_checkpointing and self.speed.checkpointed_layers is not None:
            trainer.add_callback(partial_checkpointing_callback(self.speed.checkpointed_layers))
        trainer.add_callback(
            divergence_callback(self.spec, lambda: getattr(trainer, "_tr_loss", None))
        )
        if len(self._trainer.train_dataset) == 0:
            from kubetune.trainer.data import no_examples_left

            raise DatasetUnusable(no_examples_left(self.spec.training.max_length))

    def _preference_trainer(self, model: Any, common: dict[str, Any]) -> Any:
        """TRL's DPOTrainer or KTOTrainer, resumable, its reference the base with the adapter
        disabled (kubetune.trainer.preference)."""
        from trl import DPOConfig, KTOConfig

        from kubetune.trainer.modeling import check_optimizer_runs_here
        from kubetune.trainer.resume import resumable_preference_trainer

        assert self.data is not None and self.speed is not None
        arguments = preference_arguments(
            self.spec,
            self.plan,
            self.speed,
            cuda=self.cuda,
            checkpoint_dir=str(self.checkpoint_dir),
            has_eval=self.data.eval is not None,
            progress_bar=self.progress_bar,
            distributed=self.rank.distributed,
            run_name=run_name(self.spec, self.name),
        )
        method = self.spec.method.type
        config = DPOConfig(**arguments) if method == "dpo" else KTOConfig(**arguments)
        check_optimizer_runs_here(config, model, self.speed.optimizer)
        try:
            with warnings.catch_warnings():
                # TRL 1.x marks use_liger_kernel deprecated in its preference trainers (for v2)
                # but applies Liger's layer kernels as before: nothing for a job's log.
                warnings.filterwarnings(
                    "ignore", r"`use_liger_kernel=True` is deprecated", FutureWarning
                )
                trainer = resumable_preference_trainer(method, args=config, **common)
        except ValueError as exc:
            # TRL's refusals of a setting (an lm_head adapter, KTO's micro-batch of one).
            raise InvalidConfig(f"spec.method: {exc}") from None
        if method == "dpo" and self.speed.attention == "varlen":
            from kubetune.trainer.packed_pairs import pack_padded_pairs

            pack_padded_pairs(trainer.model.get_base_model())
            log.info("DPO micro-batches run unpadded (varlen attention)")
        return trainer

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
        from kubetune.trainer.preference import reward_metrics

        evaluated = self._trainer.evaluate()
        return {
            "eval_loss": round(float(evaluated["eval_loss"]), 6),
            **reward_metrics(evaluated, prefix="eval_"),
        }

    def _evaluate(self) -> EvaluationResult:
        from kubetune.trainer.evaluation import compare_base_and_adapter

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
