"""Divergence: a loss that became NaN or infinite stops the run at once, with a reason.

Once the loss is NaN every later step is NaN too; training on would spend GPU hours on an
adapter of NaNs (and report it Succeeded). The check runs after every optimizer step, on the
loss the Trainer has summed since its last log (a NaN or inf anywhere in it stays there), and on
each logged loss; the run then fails with exit 6 (``Diverged``), which the Job does not retry:
the same data and settings would diverge again.
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
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            value = _non_finite(running_loss())
            if value is not None:
                raise Diverged(divergence_message("training loss", value, state.global_step, spec))

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
        ) -> None:
            value = _non_finite((logs or {}).get("loss"))
            if value is not None:
                raise Diverged(divergence_message("training loss", value, state.global_step, spec))

    return StopOnDivergence()
