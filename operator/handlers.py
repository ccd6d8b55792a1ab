"""kopf glue: watch caches in, one level-triggered reconcile per FineTuneJob out.

Every event (a FineTuneJob, one of its Jobs or Pods), a periodic resync and a replica taking
over the Lease all do the same thing: queue the FineTuneJob's key. A worker takes the key,
reads the FineTuneJob and its children from kopf's in-memory indexes (no API call), asks the
pure ``reconcile.plan`` what to do, and does only that: create what is missing, patch the Job
it owns, patch the status fields that changed, post an Event when the phase changes.

Importing this module registers the handlers with kopf's default registry.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from kubetune.api.contract import (
    FINETUNEJOB_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    ConditionType,
    Reason,
)
from kubetune.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION, FineTuneJobSpec
from kubetune.api.timestamps import parse_rfc3339, rfc3339
from kubetune.operator import metrics
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import Kube, collection_path, finetunejob_path, load_config
from kubetune.operator.leader import LeaseLock
from kubetune.operator.reconcile import (
    FINISHED,
    Plan,
    Rejection,
    owned_by,
    plan,
    rejected_status,
)
from kubetune.operator.render import child_names, pvc_claims, render
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import set_condition, transition
from kubetune.operator.workqueue import WorkQueue

SETTINGS = OperatorSettings()
_MANAGED: Final = {MANAGED_BY_LABEL: MANAGED_BY}
LOGGER: Final = logging.getLogger("kubetune.operator")

Key = tuple[str, str]
Obj = dict[str, Any]

_kube: Kube | None = None


def kube() -> Kube:
    global _kube  # noqa: PLW0603 - one API client per process, made at startup
    if _kube is None:
        _kube = Kube(load_config())
    return _kube


def _now() -> datetime:
    return datetime.now(UTC)


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Every line about a FineTuneJob names it (kopf's JSON formatter puts it under ``k8s``)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs


def job_logger(key: Key) -> JobLogger:
    namespace, name = key
    ref = {"apiVersion": API_VERSION, "kind": KIND, "namespace": namespace, "name": name}
    return JobLogger(LOGGER, {"k8s_ref": ref})


# --- the watch caches --------------------------------------------------------------------------


def _owner_name(annotations: Mapping[str, str]) -> str | None:
    value = annotations.get(FINETUNEJOB_ANNOTATION)
    return str(value) if value else None


@kopf.index(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
def finetunejobs_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, Obj]:
    return {(namespace, name): dict(body)}


@kopf.index("batch", "v1", "jobs", labels=_MANAGED)  # type: ignore[untyped-decorator]
def jobs_index(
    namespace: str, annotations: kopf.Annotations, body: kopf.Body, **_: Any
) -> dict[Key, Obj] | None:
    owner = _owner_name(annotations)
    return {(namespace, owner): dict(body)} if owner else None


@kopf.index("", "v1", "pods", labels=_MANAGED)  # type: ignore[untyped-decorator]
def pods_index(
    namespace: str, annotations: kopf.Annotations, body: kopf.Body, **_: Any
) -> dict[Key, Obj] | None:
    owner = _owner_name(annotations)
    return {(namespace, owner): dict(body)} if owner else None


@dataclass
class Controller:
    """What the handlers share: the indexes, the queue, what this replica wrote recently."""

    finetunejobs: kopf.Index[Key, Obj]
    jobs: kopf.Index[Key, Obj]
    pods: kopf.Index[Key, Obj]
    queue: WorkQueue[Key]
    executor: ThreadPoolExecutor
    lease: LeaseLock | None
    leader: bool = False
    #: Status this replica wrote that the cache may not show yet: read over the cached one.
    written: dict[Key, Obj] | None = None
    #: Jobs this replica created that the cache may not show yet.
    created: dict[Key, Obj] | None = None

    def __post_init__(self) -> None:
        self.written = {}
        self.created = {}


_controller: Controller | None = None


def _values(index: kopf.Index[Key, Obj], key: Key) -> list[Obj]:
    store = index.get(key)
    return list(store) if store is not None else []


def _snapshot(ctl: Controller, key: Key) -> tuple[Obj | None, list[Obj], list[Obj]]:
    """The FineTuneJob, its Jobs and Pods as this replica knows them (runs on the event loop,
    where kopf changes the indexes, so the copy is consistent)."""
    assert ctl.written is not None and ctl.created is not None
    found = _values(ctl.finetunejobs, key)
    if not found:
        ctl.written.pop(key, None)
        ctl.created.pop(key, None)
        return None, [], []
    ftj = dict(found[0])
    status = dict(ftj.get("status") or {})
    written = ctl.written.get(key)
    if written is not None:
        if all(status.get(k) == v for k, v in written.items()):
            del ctl.written[key]  # the cache has caught up with our write
        else:
            ftj["status"] = {**status, **written}
    jobs = _values(ctl.jobs, key)
    uid = str(ftj["metadata"].get("uid"))
    created = ctl.created.get(key)
    if created is not None:
        if any(owned_by(job, uid) for job in jobs) or not owned_by(created, uid):
            del ctl.created[key]
        else:
            jobs.append(created)
    return ftj, jobs, _values(ctl.pods, key)


# --- events → the queue ------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
async def finetunejob_event(
    type: str | None, namespace: str, name: str, body: kopf.Body, **_: Any
) -> None:
    key = (namespace, name)
    metrics.JOBS.observe(key, None if type == "DELETED" else body.get("status") or {})
    _enqueue(key)


@kopf.on.event("batch", "v1", "jobs", labels=_MANAGED)  # type: ignore[untyped-decorator]
async def job_event(annotations: kopf.Annotations, namespace: str, **_: Any) -> None:
    owner = _owner_name(annotations)
    if owner is not None:
        _enqueue((namespace, owner))


@kopf.on.event("", "v1", "pods", labels=_MANAGED)  # type: ignore[untyped-decorator]
async def pod_event(annotations: kopf.Annotations, namespace: str, **_: Any) -> None:
    owner = _owner_name(annotations)
    if owner is not None:
        _enqueue((namespace, owner))


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
    **_: Any,
) -> None:
    global _controller  # noqa: PLW0603 - one controller per process
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
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 30
    # A watch that goes quiet for longer than this is restarted (and the cache relisted).
    settings.watching.inactivity_timeout = SETTINGS.watch_timeout_seconds + 60
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.execution.max_workers = SETTINGS.max_workers
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]

    lease = None
    if SETTINGS.leader_election:
        identity = (
            SETTINGS.identity
            or os.environ.get("POD_NAME")
            or f"{socket.gethostname()}-{os.getpid()}"
        )
        namespace = SETTINGS.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
        lease = LeaseLock(
            kube(), namespace, SETTINGS.lease_name, identity, SETTINGS.lease_duration_seconds
        )
    _controller = Controller(
        finetunejobs=finetunejobs_index,
        jobs=jobs_index,
        pods=pods_index,
        queue=WorkQueue(),
        executor=ThreadPoolExecutor(SETTINGS.max_workers, thread_name_prefix="reconcile"),
        lease=lease,
        leader=lease is None,
    )
    if SETTINGS.metrics_port:
        start_http_server(SETTINGS.metrics_port)
    _start(_controller, logger)
    metrics.LEADER.set(1 if lease is None else 0)
    logger.info(
        "kubetune operator: watching %s; %s",
        ", ".join(SETTINGS.namespaces) if SETTINGS.namespaces else "all namespaces",
        f"leader election on Lease {lease.namespace}/{lease.name} as {lease.identity}"
        if lease
        else "no leader election",
    )


@kopf.on.cleanup()  # type: ignore[untyped-decorator]
async def stop(**_: Any) -> None:
    ctl = _controller
    if ctl is not None and ctl.lease is not None and ctl.leader:
        ctl.leader = False
        await asyncio.get_running_loop().run_in_executor(ctl.executor, ctl.lease.release)


def _resync(ctl: Controller) -> None:
    """Queue every FineTuneJob that may need work: after a takeover, and now and then."""
    for key in list(ctl.finetunejobs.keys()):
        ctl.queue.add(key)


async def _lead(ctl: Controller, logger: kopf.Logger) -> None:
    """Hold (or wait for) the Lease; on a takeover, resync everything."""
    assert ctl.lease is not None
    loop = asyncio.get_running_loop()
    last_renewed = time.monotonic()
    while True:
        try:
            held = await loop.run_in_executor(ctl.executor, ctl.lease.try_acquire_or_renew)
            if held:
                last_renewed = time.monotonic()
        except Exception as exc:  # the API is down: keep trying
            logger.warning("Lease %s: %s", ctl.lease.name, exc)
            # A leader that can't renew steps down before anyone may take over.
            held = ctl.leader and time.monotonic() - last_renewed < ctl.lease.duration * 0.8
        if held and not ctl.leader:
            ctl.leader = True
            logger.info("took the Lease %s: this replica acts now", ctl.lease.name)
            _resync(ctl)
        elif not held and ctl.leader:
            ctl.leader = False
            logger.warning("lost the Lease %s: this replica stands by", ctl.lease.name)
        metrics.LEADER.set(1 if ctl.leader else 0)
        await asyncio.sleep(SETTINGS.lease_renew_seconds)


async def _periodic_resync(ctl: Controller) -> None:
    while True:
        await asyncio.sleep(SETTINGS.status_recheck_seconds)
        if ctl.leader:
            _resync(ctl)


def _start(ctl: Controller, logger: kopf.Logger) -> None:
    tasks = [asyncio.create_task(_worker(ctl)) for _ in range(SETTINGS.max_workers)]
    tasks.append(asyncio.create_task(_periodic_resync(ctl)))
    if ctl.lease is not None:
        tasks.append(asyncio.create_task(_lead(ctl, logger)))
    _TASKS.extend(tasks)


_TASKS: list[asyncio.Task[None]] = []


async def _worker(ctl: Controller) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key = await ctl.queue.get()
        metrics.QUEUE_DEPTH.set(len(ctl.queue))
        log = job_logger(key)
        started = time.perf_counter()
        try:
            if not ctl.leader:
                continue  # the new leader resyncs everything when it takes over
            ftj, jobs, pods = _snapshot(ctl, key)
            if ftj is None:
                ctl.queue.drop(key)
                continue
            context = contextvars.copy_context()
            done = await loop.run_in_executor(
                ctl.executor, context.run, reconcile, ctl, key, ftj, jobs, pods
            )
            ctl.queue.forget(key)
            metrics.RECONCILES.labels("ok").inc()
            if done.requeue_after is not None:
                ctl.queue.add_after(key, max(done.requeue_after, 0.5))
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


# --- one reconcile (in a worker thread) ----------------------------------------------------------


def reconcile(ctl: Controller, key: Key, ftj: Obj, jobs: list[Obj], pods: list[Obj]) -> Plan:
    """Carry out the plan for one FineTuneJob; what was done, for the caller's requeue."""
    namespace, name = key
    log = job_logger(key)
    work = plan(ftj, jobs, pods, SETTINGS, _now())
    if work.reject is not None:
        _reject(ctl, key, ftj, work.reject)
        return work
    if work.create is not None:
        job = _create_children(ctl, key, ftj, work.create)
        if job is None:
            return Plan(requeue_after=SETTINGS.reference_recheck_seconds)
        log.info("children of %s/%s are in place", namespace, name)
        work = plan(ftj, [*jobs, job], pods, SETTINGS, _now())
    if work.job_patch is not None:
        job = next(j for j in jobs if owned_by(j, str(ftj["metadata"]["uid"])))
        _patch_owned_job(ftj, job, work.job_patch)
    if work.status_patch is not None:
        _write_status(ctl, key, ftj, work.status_patch)
    if work.delete:
        log.info("ttlSecondsAfterFinished passed: deleting %s/%s", namespace, name)
        with api_errors(f"deleting {namespace}/{name} after its TTL"):
            kube().delete(finetunejob_path(namespace, name))
    return work


def _write_status(ctl: Controller, key: Key, ftj: Obj, changes: Obj) -> None:
    """Merge-patch only ``changes`` (never progress); post an Event when the phase moves."""
    namespace, name = key
    old = ftj.get("status") or {}
    with api_errors(f"patching the status of {namespace}/{name}"):
        kube().merge_patch(finetunejob_path(namespace, name, "status"), {"status": changes})
    assert ctl.written is not None
    ctl.written[key] = {**ctl.written.get(key, {}), **changes}
    new = {**old, **changes}
    change = transition(old, new)
    if change is not None:
        kind, reason, message = change
        if old.get("phase") != new.get("phase"):
            metrics.TRANSITIONS.labels(str(old.get("phase") or "New"), str(new["phase"])).inc()
        post_event(ftj, kind, reason, message)
        job_logger(key).info("%s: %s", reason, message)


def post_event(ftj: Obj, kind: str, reason: str, message: str) -> None:
    """A core/v1 Event on the FineTuneJob (best effort: a lost Event never fails a reconcile)."""
    metadata = ftj["metadata"]
    now = rfc3339(_now())
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{metadata['name'][:200]}.",
            "namespace": metadata["namespace"],
        },
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        kube().request("POST", collection_path("v1", "Event", metadata["namespace"]), body=event)
    except Exception as exc:  # an Event is best effort
        LOGGER.warning("posting the event %s on %s: %s", reason, metadata["name"], exc)


def _reject(ctl: Controller, key: Key, ftj: Obj, rejection: Rejection) -> None:
    """Fail the FineTuneJob for a problem no retry can fix (no children are made)."""
    status = rejected_status(ftj, rejection, _now())
    _write_status(ctl, key, ftj, status)
    job_logger(key).warning("%s: %s", rejection.reason, rejection.message)


def missing_references(namespace: str, spec: FineTuneJobSpec) -> list[str]:
    """PVCs the spec names that don't exist in ``namespace``. Secrets are not looked at: the
    operator may not read them, and a missing one shows on the trainer pod instead."""
    missing: list[str] = []
    for claim in pvc_claims(spec):
        path = f"{collection_path('v1', 'PersistentVolumeClaim', namespace)}/{claim}"
        with api_errors(f"reading PersistentVolumeClaim {namespace}/{claim}"):
            if kube().get_or_none(path) is None:
                missing.append(f"PersistentVolumeClaim {claim!r} not found")
    return missing


def _missing_reference(ctl: Controller, key: Key, ftj: Obj, missing: list[str]) -> None:
    message = "; ".join(missing) + f" (checked again every {SETTINGS.reference_recheck_seconds:g}s)"
    status = ftj.get("status") or {}
    conditions_now = status.get("conditions") or []
    ready: Obj = next((c for c in conditions_now if c.get("type") == ConditionType.READY), {})
    if ready.get("message") == message:
        return
    generation = ftj["metadata"].get("generation")
    conditions = set_condition(
        status.get("conditions") or [],
        ConditionType.READY,
        False,
        reason=Reason.MISSING_REFERENCE,
        message=message,
        now=_now(),
        generation=generation,
    )
    _write_status(
        ctl,
        key,
        ftj,
        {"phase": "Pending", "observedGeneration": generation, "conditions": conditions},
    )


def _create_children(ctl: Controller, key: Key, ftj: Obj, spec: FineTuneJobSpec) -> Obj | None:
    """Create every child, each at most once (409 → the existing one, if it is ours); the Job,
    or None when a reference is missing. Refused creates fail the job and remove what this pass
    made."""
    namespace, name = key
    missing = missing_references(namespace, spec)
    if missing:
        _missing_reference(ctl, key, ftj, missing)
        return None
    metadata = {"name": name, "namespace": namespace, "uid": ftj["metadata"]["uid"]}
    created: list[str] = []
    job: Obj | None = None
    for manifest in render(spec, metadata, SETTINGS):
        kind, child = manifest["kind"], manifest["metadata"]["name"]
        path = f"{collection_path(manifest['apiVersion'], kind, namespace)}/{child}"
        try:
            with api_errors(f"creating {kind} {namespace}/{child}"):
                existing = kube().create(manifest)
        except kopf.PermanentError as exc:
            # The API refused what the spec asked for (an invalid value, a quota, an admission
            # policy): say so on the job, and leave nothing half-made behind.
            _delete_children(created)
            refusal = exc.__cause__
            reason = Reason.INVALID_SPEC if _status_of(refusal) == 422 else Reason.REJECTED
            _reject(ctl, key, ftj, Rejection(reason, (f"{kind} {child}: {_api_message(refusal)}",)))
            raise
        if not owned_by(existing, metadata["uid"]):
            # A same-named object that isn't ours: never take it over silently.
            _delete_children(created)
            problem = f"{kind} {child} exists and is not owned"
            rejection = Rejection(Reason.NAME_CONFLICT, (problem,))
            _reject(ctl, key, ftj, rejection)
            raise kopf.PermanentError(f"{rejection.reason}: {rejection.message}")
        created.append(path)
        if kind == "Job":
            job = existing
    assert job is not None and ctl.created is not None
    ctl.created[key] = job
    stamp = ftj["metadata"].get("creationTimestamp")
    if stamp and job["metadata"].get("uid") and path in created:
        delay = (_now() - parse_rfc3339(str(stamp))).total_seconds()
        metrics.CREATE_TO_JOB_SECONDS.observe(max(delay, 0.0))
    return job


def _status_of(error: BaseException | None) -> int | None:
    return error.status if isinstance(error, ApiException) else None


def _api_message(error: BaseException | None) -> str:
    """The apiserver's own words for a refusal (its Status message), else the HTTP reason."""
    if isinstance(error, ApiException):
        try:
            return str(json.loads(error.body or "{}").get("message") or error.reason)
        except ValueError:
            return str(error.reason)
    return str(error)


def _delete_children(paths: Iterable[str]) -> None:
    for path in reversed(list(paths)):
        with api_errors(f"cleaning up {path}"):
            kube().delete(path)


def _patch_owned_job(ftj: Obj, job: Obj, patch: Obj) -> None:
    """Patch the Job the FineTuneJob owns, with the resourceVersion that was checked, so an
    object replaced in between is a conflict (retried), never a write to someone else's Job."""
    if not owned_by(job, str(ftj["metadata"]["uid"])):
        return
    namespace = ftj["metadata"]["namespace"]
    path = collection_path("batch/v1", "Job", namespace) + "/" + job["metadata"]["name"]
    version = job["metadata"]["resourceVersion"]
    what = f"updating the Job of {namespace}/{ftj['metadata']['name']}"
    with api_errors(what):
        kube().merge_patch(path, {"metadata": {"resourceVersion": version}, **patch})


__all__ = ["FINISHED", "child_names", "reconcile"]
