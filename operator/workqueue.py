"""A deduplicating work queue of FineTuneJob keys, as controller-runtime's: each key is queued at
most once, one worker handles a key at a time, and a key that changes while it is being handled
is handled again afterwards. Runs on kopf's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Seconds before the n-th retry of a failing key (then the last, for ever, as kopf does).
BACKOFF: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._pending: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: K) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._pending:
            self._pending.add(key)
            self._queue.put_nowait(key)

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
        key = await self._queue.get()
        self._pending.discard(key)
        self._active.add(key)
        return key

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
