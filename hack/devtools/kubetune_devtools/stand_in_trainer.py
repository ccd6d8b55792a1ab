"""``kubetune-stand-in-trainer``: the trainer's command for operator tests of the job lifecycle.

Operator tests that need a trainer which sleeps, or exits with a given code, set the operator's
``KUBETUNE_TRAINER_COMMAND`` to this and give the job ``KUBETUNE_STAND_IN`` in its trainer's
env (through spec.podTemplate, allowed by that test operator's settings): ``sleep:SECONDS``,
``exit:CODE`` or ``sleep:SECONDS,exit:CODE``; a step ending in ``@N`` runs only in the pod of
node rank N of a multi-pod group (``exit:3@1,sleep:600@0``). Without it, the real
``kubetune-trainer`` runs with the same arguments, so the same operator also runs real training
jobs. The Validating phase's ``preflight`` of a job with a plan passes at once (the plan is the
training run's, and such jobs name no real data), so lifecycle tests see their trainer Job as
before.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

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
    code = 0
    node_rank = os.environ.get("JOB_COMPLETION_INDEX", "0")
    for planned in plan.split(","):
        step, _, rank = planned.partition("@")
        if rank and rank != node_rank:
            continue
        action, _, value = step.partition(":")
        if action == "sleep":
            time.sleep(float(value))
        elif action == "exit":
            code = int(value)
        else:
            print(f"{STAND_IN_ENV}: unknown step {step!r}", file=sys.stderr)
            return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
