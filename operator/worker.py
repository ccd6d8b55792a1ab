"""One worker of the operator's work queue, on kopf's event loop: take a FineTuneJob's key, skip
it when a resync brings it unchanged since its last pass, or when nothing the planner reads
changed since a pass that had nothing to do (``controller.still_quiet``: the watch event of the
operator's own status write, mostly), read it and its children from the indexes, plan
(``executor.plan_cached``, pure) and, only when the plan makes a request, carry it out on a
reconcile thread (``executor.reconcile``); then requeue it, or retry it after a failure. Most
passes make no request (the watch event of the operator's own write, a Job's status from the
Job controller): they end here, with no thread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time

import kopf

from kubetune.operator import metrics
from kubetune.operator.controller import (
    Controller,
    job_logger,
    quiet_mark,
    seen_mark,
    snapshot,
    still_quiet,
)
from kubetune.operator.executor import plan_cached, reconcile


async def work(ctl: Controller) -> None:
    """One of the operator's workers, for ever (``SETTINGS.max_workers`` of them)."""
    loop = asyncio.get_running_loop()
    while True:
        key, resynced = await ctl.queue.take()
        metrics.QUEUE_DEPTH.set(len(ctl.queue))
        log = job_logger(key)
        started = time.perf_counter()
        assert ctl.reconciled is not None
        try:
            if not ctl.leader:
                continue  # the new leader resyncs everything when it takes over
            assert ctl.quiet is not None
            ftj, jobs, pods, jobsets = snapshot(ctl, key)
            if ftj is None:
                ctl.queue.drop(key)
                ctl.reconciled.pop(key, None)
                ctl.quiet.pop(key, None)
                if ctl.progress is not None:
                    ctl.progress.forget(key)
                continue
            mark = seen_mark(ctl, key, ftj, (jobs, pods, jobsets))
            pending = ctl.progress is not None and ctl.progress.due_in(key) is not None
            if not pending and (
                (resynced and ctl.reconciled.get(key) == mark) or still_quiet(ctl, key, ftj, mark)
            ):
                # Nothing changed since its last reconcile, which planned from the same objects
                # (and queued itself again for whatever waits on time); or nothing the planner
                # reads changed since a pass that had nothing to do (the watch event of the
                # operator's own status write, most often): no pass needed.
                ctl.reconciled[key] = mark
                metrics.RECONCILES.labels("unchanged").inc()
                continue
            ctl.reconciled.pop(key, None)  # set again only when this pass succeeds
            ctl.quiet.pop(key, None)
            reported = ctl.progress.take(key) if ctl.progress is not None else None
            # Planned here from the caches (pure, well under a millisecond); a worker thread
            # only for a plan that makes requests: most passes make none.
            planned = plan_cached(ftj, jobs, pods, jobsets) if reported is None else None
            work_planned = planned[1] if planned is not None else None
            if work_planned is not None and work_planned.writes_nothing:
                done = work_planned
            else:
                context = contextvars.copy_context()
                work = functools.partial(
                    reconcile, ctl, key, ftj, jobs, pods,
                    jobsets=jobsets, progress=reported, planned=planned,
                )  # fmt: skip
                try:
                    done = await loop.run_in_executor(ctl.executor, context.run, work)
                except BaseException:
                    if reported is not None and ctl.progress is not None:
                        ctl.progress.give_back(key, reported)
                    raise
            ctl.queue.forget(key)
            ctl.reconciled[key] = mark
            if done is work_planned and done.writes_nothing and done.requeue_after is None:
                ctl.quiet[key] = quiet_mark(ftj, mark)
            metrics.RECONCILES.labels("ok").inc()
            if done.requeue_after is not None:
                ctl.queue.add_after(key, max(done.requeue_after, 0.5))
            due = ctl.progress.due_in(key) if ctl.progress is not None else None
            if due is not None:
                ctl.queue.add_after(key, max(due, 0.1))
        except kopf.TemporaryError as exc:
            wait = ctl.queue.retry(key, exc.delay if isinstance(exc.delay, int | float) else None)
            metrics.RECONCILES.labels("retry").inc()
            metrics.RETRIES.inc()
            log.warning("%s (again in %ss)", exc, wait)
        except kopf.PermanentError as exc:
            metrics.RECONCILES.labels("error").inc()
            log.error("%s", exc)
        except Exception:
            wait = ctl.queue.retry(key)
            metrics.RECONCILES.labels("error").inc()
            metrics.RETRIES.inc()
            log.exception("reconcile failed (again in %ss)", wait)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            ctl.queue.done(key)
