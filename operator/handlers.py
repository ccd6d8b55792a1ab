"""kopf glue: watch caches in, one level-triggered reconcile per FineTuneJob out.

Every event (a FineTuneJob, one of its Jobs or Pods), a periodic resync and a replica taking
over the Lease all do the same thing: queue the FineTuneJob's key. A worker takes the key,
reads the FineTuneJob and its children from kopf's in-memory indexes (no API call), and
``executor.reconcile`` makes one pass: observe, plan once (the pure ``planner.decide``), do only
that (create what is missing, patch the Job it owns, patch the status fields that changed in one
write, post an Event when the phase changes), requeue.

Importing this module registers the handlers with kopf's default registry.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.operator import jobset as js
from kubetune.operator import metrics, metrics_server, policy_watch, progress
from kubetune.operator.controller import (
    JOB_SPEC_KEPT,
    LOGGER,
    MANAGED,
    SETTINGS,
    Controller,
    job_key,
    job_logger,
    kube,
    owner_name,
    seen_mark,
    slim,
    slim_finetunejob,
    snapshot,
)
from kubetune.operator.creation import JOBSET_FALLBACK
from kubetune.operator.executor import reconcile
from kubetune.operator.kube import Kube, load_config
from kubetune.operator.leader import LeaseKeeper, LeaseLock
from kubetune.operator.objects import Key, Obj
from kubetune.operator.progress import ProgressEndpoint, ProgressInbox, TokenReviewer
from kubetune.operator.workqueue import WorkQueue

_controller: Controller | None = None


@kopf.index(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
async def finetunejobs_index(
    namespace: str, name: str, body: kopf.Body, **_: Any
) -> dict[Key, Obj]:
    return {job_key(namespace, name): slim_finetunejob(body)}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)  # type: ignore[untyped-decorator]
async def jobs_index(
    namespace: str, annotations: kopf.Annotations, body: kopf.Body, **_: Any
) -> dict[Key, Obj] | None:
    owner = owner_name(annotations)
    return {job_key(namespace, owner): slim(body, JOB_SPEC_KEPT)} if owner else None


@kopf.index("", "v1", "pods", labels=MANAGED)  # type: ignore[untyped-decorator]
async def pods_index(
    namespace: str, annotations: kopf.Annotations, body: kopf.Body, **_: Any
) -> dict[Key, Obj] | None:
    owner = owner_name(annotations)
    return {job_key(namespace, owner): slim(body, ())} if owner else None


async def jobsets_index(
    namespace: str, annotations: kopf.Annotations, body: kopf.Body, **_: Any
) -> dict[Key, Obj] | None:
    owner = owner_name(annotations)
    return {job_key(namespace, owner): slim(body, ("suspend",))} if owner else None


async def jobset_event(annotations: kopf.Annotations, namespace: str, **_: Any) -> None:
    owner = owner_name(annotations)
    if owner is not None:
        _enqueue(job_key(namespace, owner))


if SETTINGS.group_workload == "jobset":
    # Watched only where the settings ask for JobSet (the operator's RBAC grants jobsets then).
    kopf.index(js.GROUP, js.VERSION, js.PLURAL, labels=MANAGED)(jobsets_index)
    kopf.on.event(js.GROUP, js.VERSION, js.PLURAL, labels=MANAGED)(jobset_event)


if SETTINGS.trainer_network_policy:
    # The trainers' NetworkPolicies, put back when someone deletes or edits one.
    policy_watch.register(lambda: _controller)


@kopf.on.event(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
async def finetunejob_event(
    type: str | None, namespace: str, name: str, body: kopf.Body, **_: Any
) -> None:
    key = job_key(namespace, name)
    metrics.JOBS.observe(key, None if type == "DELETED" else body.get("status") or {})
    _enqueue(key)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)  # type: ignore[untyped-decorator]
async def job_event(annotations: kopf.Annotations, namespace: str, **_: Any) -> None:
    owner = owner_name(annotations)
    if owner is not None:
        _enqueue(job_key(namespace, owner))


@kopf.on.event("", "v1", "pods", labels=MANAGED)  # type: ignore[untyped-decorator]
async def pod_event(annotations: kopf.Annotations, namespace: str, **_: Any) -> None:
    owner = owner_name(annotations)
    if owner is not None:
        _enqueue(job_key(namespace, owner))


def _enqueue(key: Key) -> None:
    if _controller is not None:
        _controller.queue.add(key)
        metrics.QUEUE_DEPTH.set(len(_controller.queue))


# --- startup: settings, the workers, the Lease, the resync ---------------------------------------


@kopf.on.startup()  # type: ignore[untyped-decorator]
async def configure(
    settings: kopf.OperatorSettings,
    logger: kopf.Logger,
    finetunejobs_index: kopf.Index[Key, Obj],
    jobs_index: kopf.Index[Key, Obj],
    pods_index: kopf.Index[Key, Obj],
    **kwargs: Any,
) -> None:
    global _controller  # noqa: PLW0603 - one controller per process
    _kopf_settings(settings)
    lease = None
    if SETTINGS.leader_election:
        identity = (
            SETTINGS.identity
            or os.environ.get("POD_NAME")
            or f"{socket.gethostname()}-{os.getpid()}"
        )
        namespace = SETTINGS.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
        # An API connection of its own: renewals never wait for one the workers hold.
        own = Kube(load_config(pool_size=1), SETTINGS.api_timeout_seconds)
        lease = LeaseLock(
            own, namespace, SETTINGS.lease_name, identity, SETTINGS.lease_duration_seconds
        )
    _controller = Controller(
        finetunejobs=finetunejobs_index,
        jobs=jobs_index,
        pods=pods_index,
        queue=WorkQueue(),
        executor=ThreadPoolExecutor(SETTINGS.max_workers, thread_name_prefix="reconcile"),
        lease=lease,
        leader=lease is None,
        jobsets=kwargs.get("jobsets_index"),
    )
    if SETTINGS.group_workload == "jobset":
        present = await asyncio.get_running_loop().run_in_executor(None, jobset_served)
        _controller.use_jobset = present
        if present:
            logger.info("multi-pod groups run as JobSets (%s)", js.API_VERSION)
        else:
            logger.warning("%s", JOBSET_FALLBACK)
    if SETTINGS.metrics_port:
        metrics_server.serve(
            SETTINGS.metrics_port,
            metrics_server.Authorizer(kube()) if SETTINGS.metrics_auth else None,
        )
    if SETTINGS.progress_port:
        await _serve_progress(_controller)
    _start(_controller, logger)
    metrics.LEADER.set(1 if lease is None else 0)
    logger.info(
        "kubetune operator: watching %s; %s",
        ", ".join(SETTINGS.namespaces) if SETTINGS.namespaces else "all namespaces",
        f"leader election on Lease {lease.namespace}/{lease.name} as {lease.identity}"
        if lease
        else "no leader election",
    )


def _kopf_settings(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator: its storage, peering, scanning, watches and retries."""
    # Only indexes and event handlers: kopf stores nothing on a FineTuneJob (no finalizer, no
    # progress annotations); the state is the objects themselves.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    # Replicas coordinate through the Lease (operator/leader.py), not kopf's peering.
    settings.peering.standalone = True
    if SETTINGS.namespaces and not any(set(n) & set("*?[!") for n in SETTINGS.namespaces):
        # Named namespaces only (the chart's watchNamespaces): nothing to discover. Scanning
        # would list namespaces, which the chart grants no right to in that mode, and kopf
        # retries that for about a minute before it serves any FineTuneJob.
        settings.scanning.disabled = True
    # A watch ends on the server's timeout; the client's is a backstop for a connection that
    # broke without a word. Watches ask for bookmarks, which the apiserver sends about once a
    # minute, so one silent for longer than the inactivity timeout is dead (a dropped NAT entry,
    # a stuck proxy) and is started again from its last resourceVersion.
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 30
    settings.watching.inactivity_timeout = SETTINGS.watch_inactivity_seconds
    settings.watching.connect_timeout = 30
    # The first list of each watch comes in pages: a page of the largest FineTuneJobs the CRD
    # admits is what the operator holds at once, not every object of the cluster.
    settings.watching.chunk_size = SETTINGS.list_chunk_size
    settings.networking.request_timeout = SETTINGS.api_timeout_seconds
    settings.execution.max_workers = SETTINGS.max_workers
    # An object's kopf worker holds its last event's body until it exits, this long idle (5 s).
    settings.queueing.idle_timeout = 1.0
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]


async def _serve_progress(ctl: Controller) -> None:
    """The trainers' progress endpoint, on this loop (it reads the indexes kopf keeps here)."""
    assert SETTINGS.progress_port is not None
    ctl.progress = ProgressInbox(SETTINGS.progress_interval_seconds)

    def schedule(key: Key, delay: float) -> None:
        if delay > 0:
            ctl.queue.add_after(key, delay)
        else:
            _enqueue(key)

    endpoint = ProgressEndpoint(
        TokenReviewer(kube(), SETTINGS.progress_audience, SETTINGS.progress_reviews_per_second),
        inbox=ctl.progress,
        lookup=lambda key: snapshot(ctl, key),
        service_account=SETTINGS.trainer_service_account,
        is_leader=lambda: ctl.leader,
        schedule=schedule,
    )
    try:
        runner = await progress.serve(
            endpoint,
            SETTINGS.progress_port,
            SETTINGS.progress_tls_cert_file,
            SETTINGS.progress_tls_key_file,
            reuse_port=SETTINGS.progress_reuse_port,
        )
    except OSError as exc:
        # The port is taken (replicas sharing one host's network): this replica reconciles all
        # the same; trainers' reports reach the one that listens.
        LOGGER.error("progress endpoint: cannot listen on port %s: %s", SETTINGS.progress_port, exc)
        return
    _RUNNERS.append(runner)


def jobset_served() -> bool:
    """Whether the apiserver serves JobSets (API discovery: any identity may read it)."""
    found = kube().get_or_none(f"/apis/{js.API_VERSION}")
    return any(r.get("name") == js.PLURAL for r in (found or {}).get("resources") or [])


@kopf.on.cleanup()  # type: ignore[untyped-decorator]
async def stop(**_: Any) -> None:
    ctl = _controller
    if ctl is not None:
        ctl.leader = ctl.lease is None
    for keeper in _KEEPERS:
        await asyncio.get_running_loop().run_in_executor(None, keeper.stop)


def _resync(ctl: Controller) -> None:
    """Queue every FineTuneJob behind new work (``WorkQueue.add_resync``): after a takeover, and
    now and then. A worker skips a job as its last reconcile saw it (``seen_mark``): at 10,000
    jobs a resync costs that many comparisons, not that many reconciles."""
    for key in list(ctl.finetunejobs.keys()):
        ctl.queue.add_resync(key)
    metrics.QUEUE_DEPTH.set(len(ctl.queue))


def _take_over(ctl: Controller) -> None:
    """A takeover reconciles every job, whatever this replica saw of it before."""
    assert ctl.reconciled is not None
    ctl.reconciled.clear()
    _resync(ctl)


def _on_lease(ctl: Controller, logger: kopf.Logger) -> Callable[[bool], None]:
    """What the Lease's thread calls when this replica takes or loses the Lease: workers see
    ``ctl.leader`` at once; a takeover resyncs everything, on the loop that owns the queue."""
    assert ctl.lease is not None
    lease, loop = ctl.lease, asyncio.get_running_loop()

    def changed(held: bool) -> None:
        ctl.leader = held
        metrics.LEADER.set(1 if held else 0)
        if held:
            logger.info("took the Lease %s: this replica acts now", lease.name)
            loop.call_soon_threadsafe(_take_over, ctl)
        else:
            logger.warning("lost the Lease %s: this replica stands by", lease.name)

    return changed


async def _periodic_resync(ctl: Controller) -> None:
    while True:
        await asyncio.sleep(SETTINGS.status_recheck_seconds)
        if ctl.leader:
            _resync(ctl)


def _start(ctl: Controller, logger: kopf.Logger) -> None:
    tasks = [asyncio.create_task(_worker(ctl)) for _ in range(SETTINGS.max_workers)]
    tasks.append(asyncio.create_task(_periodic_resync(ctl)))
    if ctl.lease is not None:
        # Its own thread and API connection: a backlog of reconciles never delays a renewal.
        keeper = LeaseKeeper(
            ctl.lease, SETTINGS.lease_renew_seconds, _on_lease(ctl, logger), LOGGER
        )
        keeper.start()
        _KEEPERS.append(keeper)
    _TASKS.extend(tasks)


_TASKS: list[asyncio.Task[None]] = []
_RUNNERS: list[Any] = []
_KEEPERS: list[LeaseKeeper] = []


async def _worker(ctl: Controller) -> None:
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
            ftj, jobs, pods, jobsets = snapshot(ctl, key)
            if ftj is None:
                ctl.queue.drop(key)
                ctl.reconciled.pop(key, None)
                if ctl.progress is not None:
                    ctl.progress.forget(key)
                continue
            mark = seen_mark(ctl, key, ftj, (jobs, pods, jobsets))
            pending = ctl.progress is not None and ctl.progress.due_in(key) is not None
            if resynced and not pending and ctl.reconciled.get(key) == mark:
                # Nothing changed since its last reconcile, which planned from the same objects
                # (and queued itself again for whatever waits on time): no pass needed.
                metrics.RECONCILES.labels("unchanged").inc()
                continue
            ctl.reconciled.pop(key, None)  # set again only when this pass succeeds
            reported = ctl.progress.take(key) if ctl.progress is not None else None
            context = contextvars.copy_context()
            work = functools.partial(
                reconcile, ctl, key, ftj, jobs, pods, jobsets=jobsets, progress=reported
            )
            try:
                done = await loop.run_in_executor(ctl.executor, context.run, work)
            except BaseException:
                if reported is not None and ctl.progress is not None:
                    ctl.progress.give_back(key, reported)
                raise
            ctl.queue.forget(key)
            ctl.reconciled[key] = mark
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
