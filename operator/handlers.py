"""kopf glue: watch caches in, one level-triggered reconcile per FineTuneJob out.

Every event (a FineTuneJob, one of its Jobs or Pods), a periodic resync and a replica taking
over the Lease all do the same thing: queue the FineTuneJob's key (an event, from the watch
caches of ``caches.py``, plain list+watches that kopf's startup starts). A worker
(``worker.py``) takes the key, reads the FineTuneJob and its children from those in-memory
indexes (no API call), plans once (the pure
``planner.decide``) and, when the plan makes requests, ``executor.reconcile`` carries it out on
a thread (create what is missing, patch the Job it owns, patch the status fields that changed
in one write, post an Event when the phase changes); then requeue.

Importing this module registers the handlers with kopf's default registry.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kubetune.operator import jobset as js
from kubetune.operator import kopf_settings, metrics, metrics_server, policy_watch, progress, worker
from kubetune.operator.caches import Caches
from kubetune.operator.controller import LOGGER, SETTINGS, Controller, identity, kube, snapshot
from kubetune.operator.creation import JOBSET_FALLBACK
from kubetune.operator.kube import Kube, load_config
from kubetune.operator.leader import LeaseKeeper, LeaseLock
from kubetune.operator.objects import Key
from kubetune.operator.progress import ProgressEndpoint, ProgressInbox, TokenReviewer
from kubetune.operator.workqueue import WorkQueue

_controller: Controller | None = None
#: The watch caches (``caches.py``): started with the controller.
_caches: Caches | None = None


if SETTINGS.trainer_network_policy:
    # The trainers' NetworkPolicies, put back when someone deletes or edits one.
    policy_watch.register(lambda: _controller)


def _enqueue(key: Key) -> None:
    if _controller is not None:
        _controller.queue.add(key)
        metrics.QUEUE_DEPTH.set(len(_controller.queue))


# --- startup: settings, the workers, the Lease, the resync ---------------------------------------


@kopf.on.startup()  # type: ignore[untyped-decorator]
async def configure(
    settings: kopf.OperatorSettings,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    global _controller, _caches  # noqa: PLW0603 - one controller per process
    kopf_settings.configure(settings, kopf.get_default_registry())
    lease = None
    if SETTINGS.leader_election:
        namespace = SETTINGS.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
        # An API connection of its own: renewals never wait for one the workers hold.
        own = Kube(load_config(pool_size=1), SETTINGS.api_timeout_seconds)
        lease = LeaseLock(
            own, namespace, SETTINGS.lease_name, identity(), SETTINGS.lease_duration_seconds
        )
    caches = _caches = Caches(_enqueue)
    _controller = Controller(
        finetunejobs=caches.finetunejobs,
        jobs=caches.jobs,
        pods=caches.pods,
        queue=WorkQueue(),
        executor=ThreadPoolExecutor(SETTINGS.max_workers, thread_name_prefix="reconcile"),
        lease=lease,
        leader=lease is None,
        jobsets=caches.jobsets,
    )
    if SETTINGS.group_workload == "jobset":
        present = await asyncio.get_running_loop().run_in_executor(None, jobset_served)
        _controller.use_jobset = present
        if present:
            logger.info("multi-pod groups run as JobSets (%s)", js.API_VERSION)
        else:
            logger.warning("%s", JOBSET_FALLBACK)
    caches.start(jobsets=_controller.use_jobset)
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


async def _serve_progress(ctl: Controller) -> None:
    """The trainers' progress endpoint, on this loop (it reads the watch caches kept here)."""
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
    if _caches is not None:
        await _caches.stop()


def _resync(ctl: Controller) -> None:
    """Queue every FineTuneJob behind new work (``WorkQueue.add_resync``): after a takeover, and
    now and then. A worker skips a job as its last reconcile saw it (``seen_mark``): at 10,000
    jobs a resync costs that many comparisons, not that many reconciles."""
    for key in list(ctl.finetunejobs.keys()):
        ctl.queue.add_resync(key)
    metrics.QUEUE_DEPTH.set(len(ctl.queue))


def _take_over(ctl: Controller) -> None:
    """A takeover reconciles every job, whatever this replica saw of it before."""
    assert ctl.reconciled is not None and ctl.quiet is not None
    ctl.reconciled.clear()
    ctl.quiet.clear()
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
    tasks = [asyncio.create_task(worker.work(ctl)) for _ in range(SETTINGS.max_workers)]
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
