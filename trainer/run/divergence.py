"""Divergence: a loss that became NaN or infinite stops the run, with a reason, before
anything is logged or saved from it.

Once the loss is NaN every later step is NaN too; training on would spend GPU hours on an
adapter of NaNs (and report it Succeeded). The check runs on the loss the Trainer has summed
since its last log (a NaN or inf anywhere in it stays there), after every optimizer step, and on
each logged loss; the run then fails with exit 6 (``Diverged``), which the Job does not retry:
the same data and settings would diverge again.

Reading a GPU tensor makes the host wait until the GPU has finished everything queued, and then
the GPU waits for the host: once a step, that cost a few percent of a 7B run
(docs/performance.md). So on a GPU, after a step that writes nothing (no log, no checkpoint, not
the last), the summed loss is copied to host memory without waiting and read after the next
step, by which time the copy is done; a step that writes is checked at once, so nothing written
ever comes from a diverged step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kubetune.api.models import FineTuneJobSpec
from kubetune.trainer.errors import Diverged


def divergence_message(what: str, value: float, step: int, spec: FineTuneJobSpec) -> str:
    """What happened, where, and which knobs to turn."""
    training = spec.training
    knobs = [
        f"lower spec.training.learningRate (now {training.learning_rate:g})",
        f"raise spec.training.warmupRatio (now {training.warmup_ratio:g})",
    ]
    if spec.quantization.compute_dtype == "float16":
        knobs.append("set spec.quantization.computeDtype to bfloat16 (float16 overflows sooner)")
    return f"the {what} became {value} at step {step}: the run diverged; " + ", or ".join(knobs)


def _non_finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isfinite(number) else number


def divergence_callback(spec: FineTuneJobSpec, running_loss: Callable[[], Any]) -> Any:
    """The TrainerCallback that raises :class:`Diverged` at the first non-finite loss;
    ``running_loss()`` is the Trainer's loss summed since its last log (built late:
    transformers is a heavy import)."""
    from transformers import TrainerCallback

    class StopOnDivergence(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            # (step, host buffer, CUDA event) of a loss copied but not read yet.
            self.pending: tuple[int, Any, Any] | None = None

        def check(self, value: Any, step: int) -> None:
            number = _non_finite(value)
            if number is not None:
                raise Diverged(divergence_message("training loss", number, step, spec))

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # After transformers' flow callback, which decided what this step writes.
            if self.pending is not None:
                step, host, done = self.pending
                done.synchronize()  # the copy from a step ago; the GPU keeps its queue
                self.check(host.item(), step)
                self.pending = None
            loss = running_loss()
            writes = control.should_log or control.should_save or control.should_evaluate
            if writes or control.should_training_stop or not getattr(loss, "is_cuda", False):
                self.check(loss, state.global_step)
                return
            import torch

            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(loss.detach().float(), non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
            self.pending = (state.global_step, host, done)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
        ) -> None:
            self.check((logs or {}).get("loss"), state.global_step)

    return StopOnDivergence()
