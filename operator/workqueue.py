"""A deduplicating work queue of FineTuneJob keys, as controller-runtime's: each key is queued at
most once, one worker handles a key at a time, and a key that changes while it is being handled
is handled again afterwards. Two levels, as controller-runtime's priority queue: what an event,
a requeue or a retry brings goes ahead of what a periodic resync or a takeover queues, so a
resync of thousands of finished jobs never stands between a new job and its worker (a key
waiting at the resync level that an event queues moves up). Runs on kopf's event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Seconds before the n-th retry of a failing key (then the last, for ever, as kopf does).
BACKOFF: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        #: Keys waiting, in order: new work first, then the resync's.
        self._urgent: deque[K] = deque()
        self._resync: deque[K] = deque()
        #: One count per waiting key: a worker waits on it when both levels are empty.
        self._waiting = asyncio.Semaphore(0)
        self._pending: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: K) -> None:
        """Queue ``key`` as new work (an event, a requeue, a retry)."""
        self._add(key, resync=False)

    def add_resync(self, key: K) -> None:
        """Queue ``key`` behind every key of new work (a periodic resync, a takeover)."""
        self._add(key, resync=True)

    def _add(self, key: K, resync: bool) -> None:
        if not resync:
            # New work replaces a timed requeue; a resync doesn't: a worker may skip a key it
            # brings (nothing changed), and what waits on time (a TTL, a missing claim checked
            # again) must still come.
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._pending:
            self._pending.add(key)
            (self._resync if resync else self._urgent).append(key)
            self._waiting.release()
        elif not resync and key in self._resync:
            # Waiting behind the resync, and now an event for it: it moves up (rare, O(queue)).
            self._resync.remove(key)
            self._urgent.append(key)

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` in ``delay`` seconds (sooner if something else queues it first)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        key, _ = await self.take()
        return key

    async def take(self) -> tuple[K, bool]:
        """The next key, and whether it came from the resync's level (no event asked for it)."""
        await self._waiting.acquire()
        resync = not self._urgent
        key = self._resync.popleft() if resync else self._urgent.popleft()
        self._pending.discard(key)
        self._active.add(key)
        return key, resync

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def retry(self, key: K, delay: float | None = None) -> float:
        """Queue ``key`` again after a failure: ``delay``, else the next step of the backoff."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        wait = delay if delay is not None else BACKOFF[min(failures, len(BACKOFF) - 1)]
        self.add_after(key, wait)
        return wait

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure starts the backoff over."""
        self._failures.pop(key, None)

    def drop(self, key: K) -> None:
        """``key`` is gone: no retry, no timer."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
