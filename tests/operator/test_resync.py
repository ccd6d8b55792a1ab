"""The periodic resync: every job is queued behind new work, and one whose FineTuneJob and
children are as its last reconcile saw them costs no reconcile (what ``/metrics`` counts as
``unchanged``); one that changed since, or any job after a takeover, is reconciled."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kubetune.operator import handlers, metrics
from kubetune.operator.controller import Controller
from kubetune.operator.planner import Plan
from kubetune.operator.workqueue import WorkQueue

pytestmark = pytest.mark.unit

KEY = ("team", "suspended")


def reconciles(result: str) -> float:
    return metrics.RECONCILES.labels(result)._value.get()  # type: ignore[attr-defined, no-any-return]


def controller(version: str) -> Controller:
    ftj = {"metadata": {"name": KEY[1], "namespace": KEY[0], "uid": "u1",
                        "resourceVersion": version}, "spec": {}, "status": {}}  # fmt: skip
    job = {"metadata": {"name": KEY[1], "resourceVersion": "7"}}
    return Controller(
        finetunejobs={KEY: [ftj]},  # type: ignore[arg-type]  # what a kopf.Index answers
        jobs={KEY: [job]},  # type: ignore[arg-type]
        pods={},  # type: ignore[arg-type]
        queue=WorkQueue(),
        executor=ThreadPoolExecutor(1),
        lease=None,
        leader=True,
    )


def test_a_resync_reconciles_only_jobs_that_changed_since_their_last_reconcile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handlers, "reconcile", lambda *_a, **_k: Plan())
    ctl = controller("100")

    async def scenario() -> list[tuple[float, float]]:
        seen: list[tuple[float, float]] = []
        worker = asyncio.create_task(handlers._worker(ctl))

        async def settle(queue_it: Any) -> None:
            queue_it(KEY)
            while len(ctl.queue) or ctl.queue._active:
                await asyncio.sleep(0.01)
            seen.append((reconciles("ok"), reconciles("unchanged")))

        await settle(ctl.queue.add)  # its event: reconciled
        await settle(ctl.queue.add_resync)  # nothing changed: skipped
        ctl.finetunejobs[KEY][0]["metadata"]["resourceVersion"] = "101"  # type: ignore[index]
        await settle(ctl.queue.add_resync)  # changed (a missed event): reconciled
        handlers._take_over(ctl)  # a takeover: every job reconciled again
        await settle(lambda _key: None)
        worker.cancel()
        return seen

    ok, unchanged = reconciles("ok"), reconciles("unchanged")
    seen = asyncio.run(scenario())
    assert [(a - ok, b - unchanged) for a, b in seen] == [(1, 0), (1, 1), (2, 1), (3, 1)]
