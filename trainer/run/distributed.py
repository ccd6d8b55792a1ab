"""Data-parallel training: the group's topology, each process's rank, and what the ranks agree on.

The pod's launcher that starts the ranks is :mod:`~kubetune.trainer.run.launcher`.

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
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    NODE_RANK_ENV,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    RENDEZVOUS_PORT,
)
from kubetune.trainer.errors import InvalidConfig

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
