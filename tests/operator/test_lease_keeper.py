"""The Lease is held on a thread of its own: renewals go on while every reconcile worker is busy,
a leader that can't reach the API steps down before the Lease may pass, and a clean stop gives
it up. (Takeovers between real replicas: ``test_operator_ha.py``.)"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from kubetune.operator.leader import LeaseKeeper, LeaseLock

pytestmark = pytest.mark.unit


class Lock:
    """A LeaseLock's surface: each try answers from ``answers`` (an exception is raised)."""

    name = "kubetune-test"
    duration = 15

    def __init__(self, *answers: bool | Exception, renewals_to_see: int = 0) -> None:
        self.answers = list(answers)
        self.tries = 0
        self.released = 0
        self.enough = threading.Event()
        self.renewals_to_see = renewals_to_see

    def try_acquire_or_renew(self) -> bool:
        self.tries += 1
        if self.renewals_to_see and self.tries >= self.renewals_to_see:
            self.enough.set()
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer

    def release(self) -> None:
        self.released += 1


def keeper(lock: Lock, changes: list[bool], renew_seconds: float = 60.0) -> LeaseKeeper:
    log = logging.getLogger("test-lease")
    return LeaseKeeper(cast(LeaseLock, lock), renew_seconds, changes.append, log)


def test_renewals_go_on_while_every_reconcile_worker_is_busy() -> None:
    workers = ThreadPoolExecutor(2, thread_name_prefix="reconcile")
    release = threading.Event()
    busy = [workers.submit(release.wait) for _ in range(4)]  # a backlog: every worker taken
    lock = Lock(renewals_to_see=3)
    changes: list[bool] = []
    holder = keeper(lock, changes, renew_seconds=0.01)
    holder.start()
    try:
        assert lock.enough.wait(30), "the Lease was not renewed while the workers were busy"
        assert not any(future.done() for future in busy)
        assert changes == [True]
        assert holder.name == "lease" and holder.daemon
    finally:
        release.set()
        workers.shutdown()
        holder.stop()
    assert lock.released == 1 and changes == [True]


def test_a_leader_that_cannot_reach_the_api_steps_down_before_the_lease_may_pass() -> None:
    outage = ConnectionError("connection refused")
    lock = Lock(True, outage, outage)
    changes: list[bool] = []
    holder = keeper(lock, changes)
    assert holder.step() is True
    # Early in the outage it still holds: nobody may take the Lease over yet.
    assert holder.step() is True
    # 80% of the Lease's duration after its last renewal, it stands by.
    cast(Any, holder)._renewed -= lock.duration * 0.8
    assert holder.step() is False
    assert changes == [True, False]
    holder.stop()
    assert lock.released == 0  # not held: nothing to give up


def test_a_standby_takes_the_lease_when_it_frees_and_lets_go_when_it_is_taken() -> None:
    lock = Lock(False, False, True, False)
    changes: list[bool] = []
    holder = keeper(lock, changes)
    assert [holder.step() for _ in range(4)] == [False, False, True, False]
    assert changes == [True, False]
