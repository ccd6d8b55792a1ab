"""The work queue: one entry per FineTuneJob, one worker at a time per key, retries back off."""

from __future__ import annotations

import asyncio

import pytest

from kubetune.operator.workqueue import BACKOFF, WorkQueue

pytestmark = pytest.mark.unit


def test_a_key_queued_many_times_is_handled_once() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for _ in range(5):
            queue.add("a")
        queue.add("b")
        got = [await queue.get(), await queue.get()]
        assert len(queue) == 0
        return got

    assert asyncio.run(scenario()) == ["a", "b"]


def test_a_key_changed_while_handled_is_handled_again_after() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.add("a")  # an event while a worker has it: not a second worker
        assert len(queue) == 0
        queue.done(key)
        assert len(queue) == 1 and await queue.get() == "a"

    asyncio.run(scenario())


def test_retries_back_off_and_forget_starts_over() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        assert [queue.retry("a") for _ in range(3)] == list(BACKOFF[:3])
        queue.forget("a")
        assert queue.retry("a") == BACKOFF[0]
        assert queue.retry("a", delay=0.01) == 0.01
        queue.drop("a")

    asyncio.run(scenario())


def test_a_delayed_key_comes_at_its_time() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("a", 0.05)
        assert len(queue) == 0
        assert await asyncio.wait_for(queue.get(), 2) == "a"

    asyncio.run(scenario())


def test_new_work_goes_ahead_of_a_resync_of_every_job() -> None:
    """A periodic resync queues every FineTuneJob, finished ones too: a job created just after
    (its event) is handled next, not after the thousands the resync queued."""

    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        for index in range(10_000):
            queue.add_resync(f"finished-{index}")
        queue.add("new")
        queue.add_resync("new")  # the next resync finds it still waiting: it keeps its place
        assert await queue.get() == "new"
        assert await queue.get() == "finished-0"
        assert len(queue) == 9_999

    asyncio.run(scenario())


def test_an_event_for_a_key_waiting_behind_the_resync_moves_it_up() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "c"):
            queue.add_resync(key)
        queue.add("c")  # its job changed: new work now
        queue.add("d")
        got = [await queue.get() for _ in range(4)]
        assert got == ["c", "d", "a", "b"]
        assert len(queue) == 0

    asyncio.run(scenario())


def test_a_resynced_key_changed_while_handled_is_handled_again_as_new_work() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_resync("a")
        queue.add_resync("b")
        key = await queue.get()
        queue.add(key)  # an event while a worker has it
        queue.done(key)
        assert [await queue.get(), await queue.get()] == ["a", "b"]

    asyncio.run(scenario())


def test_a_worker_knows_whether_a_key_came_from_the_resync() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_resync("old")
        queue.add("new")
        assert await queue.take() == ("new", False)
        assert await queue.take() == ("old", True)

    asyncio.run(scenario())


def test_a_resync_keeps_a_timed_requeue_that_a_worker_may_skip() -> None:
    """A key waiting on time (a TTL, a missing claim checked again) that a resync queues, and a
    worker then skips as unchanged, still comes back at its time, as new work."""

    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("ttl", 0.2)
        queue.add_resync("ttl")
        assert await queue.take() == ("ttl", True)
        queue.done("ttl")  # skipped: nothing changed since its last reconcile
        assert await asyncio.wait_for(queue.take(), 2) == ("ttl", False)

    asyncio.run(scenario())


def test_an_event_replaces_a_timed_requeue() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("a", 0.2)
        queue.add("a")
        assert await queue.take() == ("a", False)
        queue.done("a")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.take(), 0.6)

    asyncio.run(scenario())
