"""Data-parallel training: the pod's launcher and what each rank needs to agree with the others.

A config whose ``resources.world_size`` is above 1 is trained by several ranks. The pod's main
process (``kubetune-trainer``, the pod's command) becomes the launcher: it starts
``max(gpus, 1)`` ranks through torch.distributed's elastic agent (what ``torchrun`` runs), each a
``kubetune-trainer`` of its own with the rank variables set, and waits. One pod: a standalone
rendezvous. Several pods (``resources.nodes``): a c10d rendezvous at
``$KUBETUNE_RENDEZVOUS_ENDPOINT`` under ``$KUBETUNE_RENDEZVOUS_ID``, whose store the pod with
``$JOB_COMPLETION_INDEX`` 0 hosts. NCCL on GPUs, gloo on the CPU.

- **Restarts** are Kubernetes', not the agent's (``max_restarts`` 0): a rank that fails ends
  the group, and the pod exits with that rank's code. A restart inside the pod would hide the
  exit code from the Job's podFailurePolicy (a bad dataset would be retried), would not count
  against ``backoffLimit``, and can't replace a lost pod anyway: the group restarts as a whole,
  from the newest checkpoint, when the Job (or the operator) starts its pods again.
- **One outcome.** Each rank writes its outcome to a file in a folder only this launcher uses;
  the launcher exits with the code of the first rank that failed (by time; a preempted rank is
  not a failure) and writes ONE termination message: that rank's reason and message, or on
  success the group's result (rank 0 publishes, and every rank adopts its outcome, so the pods
  of a multi-pod group report the same).
- **SIGTERM** to the pod is forwarded to the local ranks (which run in sessions of their own).
  Every rank asks the others after each optimizer step whether any of them was asked to stop,
  so they all save one checkpoint at the same step and exit 143, on every pod of the group.
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
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import (
    EXIT_CODE_REASONS,
    NODE_RANK_ENV,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    RENDEZVOUS_PORT,
    ExitCode,
)
from kubetune.api.models import TrainerResult
from kubetune.trainer import outputs
from kubetune.trainer.errors import InvalidConfig, first_line

log = logging.getLogger(__name__)

#: Set by the launcher for its ranks: the folder where each rank leaves its pid and outcome.
RANK_OUTCOMES_ENV = "KUBETUNE_RANK_OUTCOMES"
#: Written by the launcher into that folder when the pod was asked to stop.
STOP_MARKER = "stop"
#: How long the ranks of a group wait for rank 0 to publish (merge and upload included).
PUBLISH_TIMEOUT = timedelta(hours=6)
#: How long a collective may wait for a slow or lost rank before the rank fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: How long a pod waits for the others to join the rendezvous (image pulls, scheduling).
RENDEZVOUS_TIMEOUT_SECONDS = 900


# --- the topology -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """How this pod's launcher starts its ranks."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    #: "static" for one pod (standalone), "c10d" across pods.
    rdzv_backend: str
    rdzv_endpoint: str
    run_id: str
    cuda: bool

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"


def plan_topology(
    gpus: int, nodes: int, environ: dict[str, str] | os._Environ[str], visible_gpus: int
) -> Topology:
    """The launch for ``resources.gpus``/``resources.nodes`` in this pod's environment; a pod
    that was not given what a multi-pod group needs is an InvalidConfig naming the variable.

    ``visible_gpus`` is what torch sees: none (a CPU host, even one that advertises GPUs) trains
    its ranks on the CPU with gloo; fewer than ``gpus`` is refused."""
    ranks = max(gpus, 1)
    cuda = gpus > 0 and visible_gpus > 0
    if cuda and visible_gpus < ranks:
        raise InvalidConfig(
            f"resources.gpus is {gpus} but this pod sees {visible_gpus} GPU(s); one rank per GPU "
            "needs them all"
        )
    if nodes == 1:
        return Topology(ranks, 1, 0, "c10d", "localhost:0", "standalone", cuda)
    missing = [v for v in (RENDEZVOUS_ENDPOINT_ENV, NODE_RANK_ENV) if not environ.get(v)]
    if missing:
        raise InvalidConfig(
            f"resources.nodes is {nodes}, but {' and '.join(missing)} is not set in the pod: the "
            "pods of a group find each other through it"
        )
    endpoint = environ[RENDEZVOUS_ENDPOINT_ENV]
    if ":" not in endpoint.rsplit("]", 1)[-1]:
        endpoint = f"{endpoint}:{RENDEZVOUS_PORT}"
    try:
        node_rank = int(environ[NODE_RANK_ENV])
    except ValueError:
        raise InvalidConfig(
            f"{NODE_RANK_ENV} must be a number, not {environ[NODE_RANK_ENV]!r}"
        ) from None
    if not 0 <= node_rank < nodes:
        raise InvalidConfig(f"{NODE_RANK_ENV} is {node_rank}, outside 0..{nodes - 1}")
    run_id = environ.get(RENDEZVOUS_ID_ENV) or "kubetune"
    return Topology(ranks, nodes, node_rank, "c10d", endpoint, run_id, cuda)


# --- this process's place in the group ----------------------------------------------------------


@dataclass(frozen=True)
class Rank:
    """Where this process stands: rank 0 of 1 outside a group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    outcomes: Path | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def this_rank() -> Rank:
    """This process's rank, from the variables the launcher's agent sets for each rank."""
    outcomes = os.environ.get(RANK_OUTCOMES_ENV)
    if not outcomes or "RANK" not in os.environ:
        return Rank()
    return Rank(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        outcomes=Path(outcomes),
    )


def start_group(rank: Rank, cuda: bool) -> None:
    """Join the process group (before anything else needs it: accelerate reuses it) and take
    this rank's GPU."""
    import torch
    import torch.distributed as dist

    if not rank.distributed or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    global _host_group  # noqa: PLW0603 (one group per process, made once, collectively)
    _host_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if cuda else None


def barrier(rank: Rank) -> None:
    if rank.distributed:
        import torch.distributed as dist

        dist.barrier()


#: A gloo group over the same ranks, for the small host-side collectives of every step: on
#: NCCL, a flag's all-reduce would wait for the GPU to finish all queued work first.
_host_group: Any = None


def any_rank(rank: Rank, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one small all-reduce between the hosts, never waiting
    on a GPU; every rank must call it)."""
    if not rank.distributed:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value.item())


def share_from_main(rank: Rank, payload: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's ``payload``, on every rank. Through a gloo group of its own, whose timeout lets
    the other ranks wait while rank 0 publishes (a merge and an upload take a while)."""
    if not rank.distributed:
        assert payload is not None
        return payload
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=PUBLISH_TIMEOUT)
    box: list[Any] = [payload if rank.is_main else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return dict(box[0])


def end_group() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


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
    from kubetune.trainer.runner import RunOutcome, failure, run

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
