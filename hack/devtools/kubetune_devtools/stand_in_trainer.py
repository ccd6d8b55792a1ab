"""``kubetune-stand-in-trainer``: the trainer's command for operator tests of the job lifecycle.

Operator tests that need a trainer which sleeps, or exits with a given code, set the operator's
``KUBETUNE_TRAINER_COMMAND`` to this and give the job ``KUBETUNE_STAND_IN`` in its trainer's env
(through spec.podTemplate, allowed by that test operator's settings): ``sleep:SECONDS``,
``exit:CODE`` or ``sleep:SECONDS,exit:CODE``; ``progress:STEP`` reports progress at that step
through the trainer's own reporter (the config's: the operator's endpoint, with the pod's projected
token), ``until:PATH`` waits for a file (on a claim the test writes to); SIGTERM exits 143 at once;
a step ending in ``@N`` runs only in the pod of node rank N of a multi-pod group
(``exit:3@1,sleep:600@0``). Without it, the real ``kubetune-trainer`` runs with the same arguments,
so the same operator also runs real training jobs. The Validating phase's ``preflight`` of a job
with a plan passes at once (the plan is the training run's, and such jobs name no real data), so
lifecycle tests see their trainer Job as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from typing import Any

STAND_IN_ENV = "KUBETUNE_STAND_IN"


def main() -> int:
    plan = os.environ.get(STAND_IN_ENV, "")
    if not plan:
        trainer = shutil.which("kubetune-trainer")
        if trainer is None:
            print("kubetune-trainer is not on PATH", file=sys.stderr)
            return 1
        os.execv(trainer, [trainer, *sys.argv[1:]])  # noqa: S606 -- the real trainer, same args
    if sys.argv[1:2] == ["preflight"]:
        return 0
    # SIGTERM ends the run at once with 143, as the real trainer's does after its checkpoint: a
    # deleted or evicted pod goes in a second, not after its grace period (as PID 1, Python
    # would otherwise ignore the signal until the kubelet's SIGKILL).
    signal.signal(signal.SIGTERM, lambda signum, _frame: os._exit(128 + signum))
    code = 0
    node_rank = os.environ.get("JOB_COMPLETION_INDEX", "0")
    for planned in plan.split(","):
        step, _, rank = planned.partition("@")
        if rank and rank != node_rank:
            continue
        action, _, value = step.partition(":")
        if action == "sleep":
            time.sleep(float(value))
        elif action == "progress":
            reporter().report(_progress(int(value)))
        elif action == "until":
            while not os.path.exists(value):
                time.sleep(0.2)
        elif action == "exit":
            code = int(value)
        else:
            print(f"{STAND_IN_ENV}: unknown step {step!r}", file=sys.stderr)
            return 1
    close = getattr(_REPORTER[0], "close", None) if _REPORTER else None
    if close is not None:
        close(timeout=60)  # the last report reaches the operator before the exit
    return code


_REPORTER: list[Any] = []


def reporter() -> Any:
    """The trainer's reporter for the config the operator gave this pod (made once)."""
    if not _REPORTER:
        from kubetune.api.config import load_trainer_config
        from kubetune.trainer.run.progress import reporter_from_settings

        config = load_trainer_config(sys.argv[sys.argv.index("--config") + 1])
        _REPORTER.append(reporter_from_settings(config.progress, config.job))
    return _REPORTER[0]


def _progress(step: int) -> Any:
    from kubetune.api.models import Progress
    from kubetune.api.timestamps import rfc3339

    return Progress(step=step, total_steps=100, percent=float(step), updated_at=rfc3339())


if __name__ == "__main__":
    raise SystemExit(main())
