"""How a pod's launcher starts its ranks, and which exit code and message the pod ends with:
pure functions, no training."""

from __future__ import annotations

import pytest

from kubetune.api.contract import ExitCode
from kubetune.api.models import TrainerResult
from kubetune.trainer.errors import InvalidConfig
from kubetune.trainer.run.distributed import plan_topology
from kubetune.trainer.run.launcher import RankOutcome, group_outcome

pytestmark = pytest.mark.unit


def test_one_pod_with_gpus_runs_one_nccl_rank_per_gpu_at_a_standalone_rendezvous() -> None:
    topology = plan_topology(4, 1, {}, visible_gpus=4)
    assert (topology.nproc_per_node, topology.nnodes, topology.backend) == (4, 1, "nccl")
    assert topology.rdzv_endpoint == "localhost:0"  # a free port on this pod


def test_a_host_without_gpus_trains_the_ranks_on_the_cpu_with_gloo() -> None:
    # The local node advertises GPUs it doesn't have: two ranks, on the CPU.
    assert plan_topology(2, 1, {}, visible_gpus=0).backend == "gloo"
    assert plan_topology(0, 3, _pod(1), visible_gpus=8).nproc_per_node == 1
    assert plan_topology(0, 3, _pod(1), visible_gpus=8).backend == "gloo"


def test_fewer_visible_gpus_than_asked_is_refused() -> None:
    with pytest.raises(InvalidConfig, match=r"resources\.gpus is 4 but this pod sees 2"):
        plan_topology(4, 1, {}, visible_gpus=2)


def _pod(index: int, endpoint: str = "job-0.job:29400") -> dict[str, str]:
    return {
        "KUBETUNE_RENDEZVOUS_ENDPOINT": endpoint,
        "KUBETUNE_RENDEZVOUS_ID": "uid-1",
        "JOB_COMPLETION_INDEX": str(index),
    }


def test_pods_of_a_group_meet_at_rank_0s_c10d_rendezvous_under_the_attempts_id() -> None:
    topology = plan_topology(2, 3, _pod(2, endpoint="job-0.job"), visible_gpus=2)
    assert topology.rdzv_backend == "c10d"
    assert topology.rdzv_endpoint == "job-0.job:29400"  # the contract's port when none is given
    assert (topology.run_id, topology.node_rank, topology.nnodes) == ("uid-1", 2, 3)


@pytest.mark.parametrize("missing", ["KUBETUNE_RENDEZVOUS_ENDPOINT", "JOB_COMPLETION_INDEX"])
def test_a_pod_of_a_group_without_its_rendezvous_variables_names_them(missing: str) -> None:
    env = _pod(0)
    del env[missing]
    with pytest.raises(InvalidConfig, match=f"{missing} is not set"):
        plan_topology(1, 2, env, visible_gpus=1)


def _outcome(rank: int, code: ExitCode, at: float, message: str = "") -> RankOutcome:
    outcome = "Succeeded" if code == ExitCode.SUCCEEDED else "Failed"
    reason = {0: "Succeeded", 1: "TrainerError", 3: "DatasetError", 5: "OutOfMemory",
              143: "Preempted"}[code]  # fmt: skip
    result = TrainerResult(outcome=outcome, reason=reason, message=message or reason)
    return RankOutcome(rank=rank, exit_code=int(code), time=at, result=result)


def test_the_first_failing_rank_gives_the_pod_its_exit_code_and_message() -> None:
    # Rank 1 ran out of memory; rank 0 failed after it, because its peer was gone.
    code, result = group_outcome(
        [
            _outcome(0, ExitCode.UNEXPECTED, at=2.0, message="connection reset by peer"),
            _outcome(1, ExitCode.OUT_OF_MEMORY, at=1.0, message="lower training.maxLength"),
        ],
        died={},
        stopped=False,
    )
    assert code == ExitCode.OUT_OF_MEMORY and result.message == "lower training.maxLength"


def test_a_preempted_group_exits_143_with_rank_0s_message() -> None:
    code, result = group_outcome(
        [_outcome(1, ExitCode.PREEMPTED, 1.0, "b"), _outcome(0, ExitCode.PREEMPTED, 2.0, "a")],
        died={},
        stopped=True,
    )
    assert (code, result.message) == (143, "a")


def test_sigterm_before_any_rank_trained_is_still_a_preemption() -> None:
    code, result = group_outcome([], died={0: -15, 1: -15}, stopped=True)
    assert code == 143 and "before training began" in result.message


def test_a_rank_killed_without_an_outcome_is_an_unexpected_retriable_failure() -> None:
    code, result = group_outcome(
        [_outcome(0, ExitCode.SUCCEEDED, 1.0)], died={1: -9}, stopped=False
    )
    assert code == ExitCode.UNEXPECTED and "local rank 1 was killed by signal 9" in result.message


def test_a_group_that_succeeded_reports_rank_0s_result() -> None:
    code, result = group_outcome(
        [_outcome(1, ExitCode.SUCCEEDED, 1.0, "b"), _outcome(0, ExitCode.SUCCEEDED, 1.0, "a")],
        died={},
        stopped=False,
    )
    assert (code, result.message) == (0, "a")


def test_a_stopped_pod_whose_ranks_failed_in_a_collective_is_preempted() -> None:
    # Rank 1 was stopped during setup; rank 0 then failed waiting for it.
    code, _ = group_outcome(
        [_outcome(0, ExitCode.UNEXPECTED, 2.0, "connection closed by peer")],
        died={1: -15},
        stopped=True,
    )
    assert code == ExitCode.PREEMPTED
