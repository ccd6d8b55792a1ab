"""A resumed run continues the interrupted one, in its weights and in its numbers.

Two things transformers' Trainer does not carry over a restart, and this module does:

- **The adapter's dtype.** TRL keeps a QLoRA adapter's trainable weights in bf16 (the QLoRA
  paper's recommendation), and checkpoints save them so. On resume the Trainer reloads them with
  PEFT's ``load_adapter``, whose ``autocast_adapter_dtype=True`` default upcasts bf16 and fp16
  adapter weights to fp32: the resumed run trained in another precision than the one it stopped
  in and saved an adapter twice the size. The resumable trainers put every parameter back
  into the dtype it had before the load (bf16 → fp32 → bf16 is exact), before the optimizer is
  built, so its state is restored in the same dtype as well.
- **The running loss.** Between logs the Trainer sums the step losses in memory, and the
  run's ``train_loss`` is the sum of every step's loss over the steps. A restart began both at
  zero, so the first log after a resume averaged only the new steps and ``train_loss`` divided
  this attempt's losses by all the run's steps. Each checkpoint now stores those totals
  (:data:`RUNNING_TOTALS`), and a resumed run starts from them.

And one it gets wrong: resumed from the checkpoint of its last step (a retry after a failure in
publishing), the Trainer trains one step past ``max_steps``, since it checks for the end only
after a step. A finished checkpoint is loaded instead, and nothing is trained.

Optimizer, scheduler, RNG state and the position in the data are the Trainer's own checkpoint
contents, and are restored by it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubetune.trainer.dataset.bucketing import counting_padding, take_padding
from kubetune.trainer.run.checkpoints import CHECKPOINT_PREFIX, TRAINER_STATE
from kubetune.trainer.run.step_metrics import DeferredStepMetrics

log = logging.getLogger(__name__)

RUNNING_TOTALS = "kubetune_running_totals.json"


@dataclass(frozen=True)
class RunningTotals:
    """What the Trainer holds in memory about the run's loss and time, at a checkpoint."""

    #: Sum of the step losses up to the last log.
    logged_loss: float
    #: Sum of the step losses since the last log.
    pending_loss: float
    last_logged_step: int
    #: Seconds spent training the steps up to this checkpoint, over all attempts.
    train_seconds: float

    def write(self, checkpoint: Path) -> None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / RUNNING_TOTALS).write_text(json.dumps(asdict(self)) + "\n", "utf-8")

    @classmethod
    def read(cls, checkpoint: Path) -> RunningTotals | None:
        try:
            data = json.loads((checkpoint / RUNNING_TOTALS).read_text("utf-8"))
            return cls(
                logged_loss=float(data["logged_loss"]),
                pending_loss=float(data["pending_loss"]),
                last_logged_step=int(data["last_logged_step"]),
                train_seconds=float(data["train_seconds"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def finished_at(checkpoint: Path) -> int | None:
    """The step of a checkpoint written at the end of its run (None for one in the middle)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text("utf-8"))
        step, last = int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if 0 < last <= step else None


def _continue_running_totals(trainer: Any) -> Any:
    """A callback that starts the Trainer's loss sums from the checkpoint's (after it reset them
    to 0); built late: transformers is heavy."""
    from transformers import TrainerCallback

    class ContinueRunningTotals(TrainerCallback):  # type: ignore[misc]
        """Starts the Trainer's loss sums from the checkpoint's (after it reset them to 0)."""

        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            trainer = self.trainer
            trainer.attempt_started = time.monotonic()
            if state.global_step == 0:
                return
            checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            totals = RunningTotals.read(checkpoint)
            if totals is None:
                log.warning(
                    "%s holds no running totals: train_loss counts this attempt's steps only",
                    checkpoint.name,
                )
                return
            trainer._total_loss_scalar = totals.logged_loss
            trainer._tr_loss += totals.pending_loss
            trainer._globalstep_last_logged = totals.last_logged_step
            trainer.resumed_totals = totals

    return ContinueRunningTotals(trainer)


class ResumeMixin:
    """The resume behaviour described above, mixed in before any of TRL's trainers."""

    args: Any
    accelerator: Any
    model: Any
    state: Any
    control: Any  # the Trainer's TrainerControl
    callback_handler: Any
    optimizer: Any
    lr_scheduler: Any
    _tr_loss: Any
    _total_loss_scalar: float
    _globalstep_last_logged: int

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resumed_totals: RunningTotals | None = None
        self.attempt_started = time.monotonic()
        self.add_callback(_continue_running_totals(self))  # type: ignore[attr-defined]

    @property
    def earlier_train_seconds(self) -> float:
        return self.resumed_totals.train_seconds if self.resumed_totals else 0.0

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        import torch
        from transformers import TrainerState
        from transformers.trainer_utils import TrainOutput

        if resume_from_checkpoint is None:
            return super().train(**kwargs)  # type: ignore[misc]
        step = finished_at(Path(resume_from_checkpoint))
        if step is None:
            return super().train(  # type: ignore[misc]
                resume_from_checkpoint=resume_from_checkpoint, **kwargs
            )
        log.info("%s is the run's last step: nothing left to train", resume_from_checkpoint)
        self._load_from_checkpoint(resume_from_checkpoint)
        self.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE))
        # What the training loop sets up before it tells the callbacks it begins.
        self._tr_loss = torch.tensor(0.0, device=self.args.device)
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = step
        handler = self.callback_handler
        self.control = handler.on_train_begin(self.args, self.state, self.control)
        loss = (self._total_loss_scalar + float(self._tr_loss.item())) / step
        self.control = handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(step, loss, {"train_loss": loss, "train_runtime": 0.0})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model if model is not None else self.model
        trained_in = {name: p.dtype for name, p in target.named_parameters()}
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        restored = 0
        for name, param in target.named_parameters():
            dtype = trained_in.get(name)
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
                restored += 1
        if restored:
            log.info("%d parameters back in the dtype they were trained in", restored)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc,no-any-return]
        import torch

        # CPU ranks: accelerate names each one's device "cpu:0", and the Trainer loads the
        # optimizer with that as torch.load's map_location, which torch can't map to.
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        folder = Path(checkpoint)
        if (folder / OPTIMIZER_NAME).is_file() and (folder / SCHEDULER_NAME).is_file():
            optimizer = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(optimizer)
            scheduler = torch.load(folder / SCHEDULER_NAME, weights_only=True)
            self.lr_scheduler.load_state_dict(scheduler)
        return None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Written before the Trainer's own files: a checkpoint is complete when its
        # trainer_state.json is there, and then its totals are there too.
        checkpoint = Path(self._get_output_dir(trial)) / (  # type: ignore[attr-defined]
            f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        )
        # The loss since the last log is each rank's own; the log will average the ranks'.
        pending = self._tr_loss.detach().clone()
        if self.args.world_size > 1:
            pending = self.accelerator.gather(pending.reshape(1)).mean()
        if self.args.should_save:  # rank 0 of a group: the others leave the output alone
            RunningTotals(
                logged_loss=float(self._total_loss_scalar),
                pending_loss=float(pending.item()),
                last_logged_step=int(self._globalstep_last_logged),
                train_seconds=self.earlier_train_seconds
                + (time.monotonic() - self.attempt_started),
            ).write(checkpoint)
        super()._save_checkpoint(model, trial)  # type: ignore[misc]


def resumable_sft_trainer(**kwargs: Any) -> Any:
    """``trl.SFTTrainer(**kwargs)`` that resumes as described above (built late: TRL is heavy)."""
    import torch
    from trl import SFTTrainer

    class ResumableSFTTrainer(ResumeMixin, DeferredStepMetrics, SFTTrainer):  # type: ignore[misc]
        data_collator: Any

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if self.args.pad_to_multiple_of and self.padding_free:
                self.data_collator = counting_padding(self.data_collator)

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any) -> Any:
            padding = take_padding(inputs)
            if self.defers_metrics:  # tokens counted here, real ones only (step_metrics)
                self.count_tokens(inputs, padding)
                return super().training_step(model, inputs, *args)
            if self.args.pad_to_multiple_of and self.padding_free and self.args.world_size > 1:
                # TRL counts the tokens of every rank (gathered); so is their padding.
                local = torch.tensor(padding, device=self.args.device)
                padding = int(self.accelerator.gather_for_metrics(local).sum().item())
            loss = super().training_step(model, inputs, *args)
            if padding:
                # TRL counted the bucket's padding as trained tokens; num_tokens is real ones.
                self._total_train_tokens -= padding
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
            take_padding(inputs)
            return super().prediction_step(model, inputs, *args, **kw)

    return ResumableSFTTrainer(**kwargs)


def resumable_preference_trainer(method: str, **kwargs: Any) -> Any:
    """``trl.DPOTrainer(**kwargs)`` (``method`` dpo) or ``trl.KTOTrainer(**kwargs)`` (kto) that
    resumes as described above. With a PEFT model and no ``ref_model``, TRL's reference pass is
    the same model with the adapter disabled: no second copy of the 4-bit weights."""
    from trl import DPOTrainer, KTOTrainer

    base = DPOTrainer if method == "dpo" else KTOTrainer

    class ResumablePreferenceTrainer(ResumeMixin, base):  # type: ignore[misc,valid-type]
        pass

    return ResumablePreferenceTrainer(ref_model=None, **kwargs)
