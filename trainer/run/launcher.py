"""The pod's launcher of a data-parallel run: starts the ranks, makes one outcome of theirs.

It starts the ranks through torch.distributed's elastic agent, forwards SIGTERM to them, and turns
their outcomes into the pod's one exit code and termination message
(:mod:`~kubetune.trainer.run.distributed` says how, and what the ranks agree on among themselves).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import (
    EXIT_CODE_REASONS,
    ExitCode,
)
from kubetune.api.models import TrainerResult
from kubetune.trainer.errors import InvalidConfig, first_line
from kubetune.trainer.publish import outputs
from kubetune.trainer.run.distributed import (
    RANK_OUTCOMES_ENV,
    RENDEZVOUS_TIMEOUT_SECONDS,
    STOP_MARKER,
    Rank,
    Topology,
    end_group,
    plan_topology,
)

log = logging.getLogger(__name__)


# --- the outcome of each rank -------------------------------------------------------------------


def register(rank: Rank) -> bool:
    """Leave this rank's pid for the launcher (it forwards SIGTERM); False when the pod was
    already asked to stop before this rank started."""
    if rank.outcomes is None:
        return True
    (rank.outcomes / f"rank-{rank.local_rank}.pid").write_text(str(os.getpid()))
    return not (rank.outcomes / STOP_MARKER).exists()


def write_outcome(rank: Rank, exit_code: int, result: TrainerResult) -> None:
    if rank.outcomes is None:
        return
    record = {
        "rank": rank.rank,
        "exitCode": exit_code,
        "time": time.time(),
        "result": outputs.result_json(result),
    }
    path = rank.outcomes / f"rank-{rank.local_rank}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record), encoding="utf-8")
    partial.replace(path)


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    exit_code: int
    time: float
    result: TrainerResult


def read_outcomes(directory: Path) -> list[RankOutcome]:
    found = []
    for path in sorted(directory.glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(path.read_text("utf-8"))
            found.append(
                RankOutcome(
                    rank=int(data["rank"]),
                    exit_code=int(data["exitCode"]),
                    time=float(data["time"]),
                    result=TrainerResult.model_validate(data["result"]),
                )
            )
    return found


def group_outcome(
    outcomes: list[RankOutcome], died: dict[int, int], stopped: bool
) -> tuple[int, TrainerResult]:
    """The pod's exit code and result from its ranks' outcomes.

    ``died`` maps the local ranks that ended without an outcome to their exit codes (negative
    for a signal); ``stopped`` says the pod got SIGTERM. The first failure wins: the ranks that
    fail after it mostly fail because of it (a peer gone)."""
    failures = sorted(
        (o for o in outcomes if o.exit_code not in (ExitCode.SUCCEEDED, ExitCode.PREEMPTED)),
        key=lambda o: o.time,
    )
    if stopped:
        # A rank stopped before it could checkpoint leaves its peers failing in a collective:
        # the stop is the cause. A failure a retry can't fix is still reported as itself.
        failures = [o for o in failures if o.exit_code != ExitCode.UNEXPECTED]
    if failures:
        return failures[0].exit_code, failures[0].result
    preempted = [o for o in outcomes if o.exit_code == ExitCode.PREEMPTED]
    if preempted or stopped:
        if preempted:
            return int(ExitCode.PREEMPTED), min(preempted, key=lambda o: o.rank).result
        return int(ExitCode.PREEMPTED), _failure(
            ExitCode.PREEMPTED, "stopped by SIGTERM before training began; nothing to resume yet"
        )
    if died:
        local, code = min(died.items())
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        return int(ExitCode.UNEXPECTED), _failure(
            ExitCode.UNEXPECTED, f"local rank {local} {how} without saying why (see its log)"
        )
    if not outcomes:
        return int(ExitCode.UNEXPECTED), _failure(
            ExitCode.UNEXPECTED, "no rank reported an outcome"
        )
    return int(ExitCode.SUCCEEDED), min(outcomes, key=lambda o: o.rank).result


def _failure(code: ExitCode, message: str) -> TrainerResult:
    return TrainerResult(outcome="Failed", reason=EXIT_CODE_REASONS[code], message=message)


# --- the launcher -------------------------------------------------------------------------------


class _Forwarder:
    """Passes SIGTERM on to the ranks (each runs in a session of its own)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stopped = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True
        log.warning("SIGTERM received: asking every rank to checkpoint and stop")
        (self.directory / STOP_MARKER).touch()
        for pid_file in self.directory.glob("rank-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)

    def __enter__(self) -> _Forwarder:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def launch(
    config: TrainerConfig,
    config_path: str | None,
    extra_args: list[str],
    *,
    write_termination: bool = True,
) -> tuple[int, TrainerResult]:
    """Start this pod's ranks and wait: the exit code and result of the group (see the module
    docstring), also written as the one termination message."""
    import torch

    spec = config.spec
    with tempfile.TemporaryDirectory(prefix="kubetune-ranks-") as folder:
        directory = Path(folder)
        try:
            topology = plan_topology(
                spec.resources.gpus, spec.resources.nodes, os.environ, torch.cuda.device_count()
            )
        except InvalidConfig as exc:
            log.error("%s", exc.log_line())
            result = _failure(ExitCode.INVALID_CONFIG, exc.message)
            if write_termination:
                outputs.write_termination_message(result)
            return int(ExitCode.INVALID_CONFIG), result
        if config_path is None:
            config_path = str(directory / "config.yaml")
            Path(config_path).write_text(config.to_yaml(), encoding="utf-8")
        log.info(
            "starting %d rank(s) on this pod (%d pod(s), %s, %s rendezvous)",
            topology.nproc_per_node,
            topology.nnodes,
            topology.backend,
            "standalone" if topology.nnodes == 1 else f"c10d at {topology.rdzv_endpoint}",
        )
        args = ["-m", "kubetune.trainer.cli", "--config", config_path, *extra_args]
        died, stopped, error = run_ranks(topology, args, directory)
        code, result = group_outcome(read_outcomes(directory), died, stopped)
        if error is not None and code == ExitCode.UNEXPECTED:
            result = _failure(ExitCode.UNEXPECTED, error)
    if write_termination:
        outputs.write_termination_message(result)
    if code != ExitCode.SUCCEEDED:
        log.error("%s: %s", result.reason, result.message)
    return code, result


def run_ranks(
    topology: Topology, args: list[str], directory: Path
) -> tuple[dict[int, int], bool, str | None]:
    """Run ``python ARGS`` as this pod's ranks (each with ``$KUBETUNE_RANK_OUTCOMES`` set to
    ``directory``) through the elastic agent, until they end: the local ranks that died without
    an outcome (with their exit codes), whether the pod was asked to stop, and what kept the
    ranks from starting (a rendezvous that never completed), if anything did."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rdzv_configs: dict[str, Any] = {"timeout": RENDEZVOUS_TIMEOUT_SECONDS}
    if topology.nnodes > 1:
        # The pod of completion index 0 hosts the rendezvous store: decided, not guessed from
        # host names (pods on one machine would all take themselves for the host).
        rdzv_configs.update(is_host=topology.node_rank == 0, read_timeout=600)
    launch_config = LaunchConfig(
        min_nodes=topology.nnodes,
        max_nodes=topology.nnodes,
        nproc_per_node=topology.nproc_per_node,
        run_id=topology.run_id,
        rdzv_backend=topology.rdzv_backend,
        rdzv_endpoint=topology.rdzv_endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=0,
        monitor_interval=0.5,
        # SIGTERM is ours to forward (the agent would give the ranks 30 s, then SIGKILL).
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",
    )
    os.environ[RANK_OUTCOMES_ENV] = str(directory)
    died: dict[int, int] = {}
    error = None
    with _Forwarder(directory) as forwarder:
        try:
            elastic_launch(launch_config, sys.executable)(*args)
        except ChildFailedError as exc:
            reported = {o.rank for o in read_outcomes(directory)}
            for global_rank, failure in exc.failures.items():
                if global_rank not in reported:
                    died[failure.local_rank] = failure.exitcode
        except Exception as exc:  # the rendezvous or the agent itself
            error = f"the ranks could not be started: {type(exc).__name__}: {first_line(exc)}"
            log.error("%s", error)
        finally:
            os.environ.pop(RANK_OUTCOMES_ENV, None)
    return died, forwarder.stopped, error


def run_rank(rank: Rank, config: TrainerConfig, *, name: str) -> int:
    """One rank's run: its outcome goes to the launcher's folder, not to the termination log."""
    from kubetune.trainer.run.runner import RunOutcome, failure, run

    if not register(rank):
        message = "stopped by SIGTERM before training began; nothing to resume yet"
        outcome = RunOutcome(int(ExitCode.PREEMPTED), failure(ExitCode.PREEMPTED, message))
    else:
        outcome = run(config, name=name, write_termination=False, rank=rank)
    write_outcome(rank, outcome.exit_code, outcome.result)
    if outcome.exit_code in (ExitCode.SUCCEEDED, ExitCode.PREEMPTED):
        # Every rank got here together. After a failure a peer may be gone, and tearing the
        # group down could wait on it: the process just exits.
        end_group()
    return outcome.exit_code
