"""The periodic resync: every job is queued behind new work, and one whose FineTuneJob and
children are as its last reconcile saw them costs no reconcile (what ``/metrics`` counts as
``unchanged``); one that changed since, or any job after a takeover, is reconciled."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api.timestamps import rfc3339
from kubetune.operator import handlers, metrics, worker
from kubetune.operator.controller import Controller
from kubetune.operator.planner import Plan
from kubetune.operator.status import derive_status
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
    monkeypatch.setattr(worker, "reconcile", lambda *_a, **_k: Plan())
    ctl = controller("100")

    async def scenario() -> list[tuple[float, float]]:
        seen: list[tuple[float, float]] = []
        task = asyncio.create_task(worker.work(ctl))

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
        task.cancel()
        return seen

    ok, unchanged = reconciles("ok"), reconciles("unchanged")
    seen = asyncio.run(scenario())
    assert [(a - ok, b - unchanged) for a, b in seen] == [(1, 0), (1, 1), (2, 1), (3, 1)]


def _running_job() -> dict[str, Any]:
    """The trainer's Job of ``KEY``'s FineTuneJob (uid u1), one pod active."""
    return {"metadata": {"name": KEY[1], "uid": "j1", "resourceVersion": "7",
                         "ownerReferences": [{"uid": "u1", "controller": True}]},
            "spec": {"suspend": False}, "status": {"active": 1}}  # fmt: skip


def _finetunejob(created: datetime) -> dict[str, Any]:
    """``KEY``'s FineTuneJob (uid u1, generation 1, validation off), no status yet."""
    return {"metadata": {"name": KEY[1], "namespace": KEY[0], "uid": "u1", "generation": 1,
                         "resourceVersion": "100", "creationTimestamp": rfc3339(created)},
            "spec": {"model": {"uri": "org/model"}, "output": {"uri": "s3://bucket/a"},
                     "dataset": {"uri": "https://datasets.example/train.jsonl"},
                     "validation": {"enabled": False}}}  # fmt: skip


def test_a_pass_that_makes_no_request_is_planned_on_the_loop_and_takes_no_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch event of the operator's own status write, a Job's status the Job controller
    wrote: the plan makes no request, so the pass ends on the loop; a plan that writes goes to
    a worker thread with the plan made (not planned twice)."""
    handed: list[Any] = []
    monkeypatch.setattr(worker, "reconcile", lambda *_a, **k: handed.append(k) or Plan())
    started = datetime.now(UTC) - timedelta(minutes=5)
    job = _running_job()
    pod = {"metadata": {"name": f"{KEY[1]}-abc", "creationTimestamp": rfc3339(started),
                        "ownerReferences": [{"uid": "j1", "controller": True}]},
           "status": {"phase": "Running", "startTime": rfc3339(started), "containerStatuses": [
               {"name": "trainer", "state": {"running": {"startedAt": rfc3339(started)}}}]}}  # fmt: skip
    ftj = _finetunejob(started)
    ftj["status"] = derive_status(ftj, job, [pod], datetime.now(UTC))
    ctl = controller("100")
    ctl.finetunejobs[KEY] = [ftj]  # type: ignore[index]
    ctl.jobs[KEY], ctl.pods[KEY] = [job], [pod]  # type: ignore[index]
    ctl.executor = ThreadPoolExecutor(1, initializer=lambda: handed.append("a thread"))

    async def scenario() -> list[Any]:
        task = asyncio.create_task(worker.work(ctl))
        seen = []
        for version, status in (("101", ftj["status"]), ("102", {})):
            ftj["metadata"]["resourceVersion"] = version
            ftj["status"] = status
            ok = reconciles("ok")
            ctl.queue.add(KEY)
            while len(ctl.queue) or ctl.queue._active:
                await asyncio.sleep(0.01)
            seen.append((reconciles("ok") - ok, list(handed)))
        task.cancel()
        return seen

    quiet, written = asyncio.run(scenario())
    assert quiet == (1, [])  # reconciled, and nothing reached a worker thread
    count, (thread, call) = written[0], written[1]
    assert count == 1 and thread == "a thread"
    _seen, work = call["planned"]
    assert work.status_patch is not None and work.status_patch["phase"] == "Running"


def test_an_event_that_changes_nothing_a_plan_reads_after_a_pass_with_nothing_to_do_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch event of the operator's own status write (a new resourceVersion, the status a
    pass already planned from) costs no plan; a child's change, the status changed by someone
    else, or a new spec is planned again."""
    handed: list[Any] = []
    monkeypatch.setattr(worker, "reconcile", lambda *_a, **k: handed.append(k) or Plan())
    started = datetime.now(UTC) - timedelta(minutes=5)
    job = _running_job()
    ftj = _finetunejob(started)
    ftj["status"] = derive_status(ftj, job, [], datetime.now(UTC))
    ctl = controller("100")
    ctl.finetunejobs[KEY] = [ftj]  # type: ignore[index]
    ctl.jobs[KEY] = [job]  # type: ignore[index]

    def echo(version: str) -> None:
        ftj["metadata"]["resourceVersion"] = version
        ftj["status"] = copy.deepcopy(ftj["status"])  # as a watch event parses it anew

    def job_changed() -> None:
        job["metadata"]["resourceVersion"] = "8"
        job["status"] = {"active": 1, "ready": 1}

    def status_changed() -> None:
        ftj["metadata"]["resourceVersion"] = "103"
        ftj["status"] = {**ftj["status"], "worldSize": 2}

    def spec_changed() -> None:
        ftj["metadata"].update(resourceVersion="104", generation=2)

    async def scenario() -> list[tuple[float, float]]:
        task = asyncio.create_task(worker.work(ctl))
        seen = []
        for change in (lambda: None, lambda: echo("101"), job_changed, lambda: echo("102"),
                       status_changed, spec_changed):  # fmt: skip
            ok, unchanged = reconciles("ok"), reconciles("unchanged")
            change()
            ctl.queue.add(KEY)
            while len(ctl.queue) or ctl.queue._active:
                await asyncio.sleep(0.01)
            seen.append((reconciles("ok") - ok, reconciles("unchanged") - unchanged))
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == [(1, 0), (0, 1), (1, 0), (0, 1), (1, 0), (1, 0)]
    # Written: the status someone else changed (back), the new generation (observedGeneration).
    first, second = (call["planned"][1].status_patch for call in handed)
    assert first == {"worldSize": 1}
    assert second["observedGeneration"] == 2
