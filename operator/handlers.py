"""kopf handlers: thin glue between the API server and the pure ``render`` and ``derive_status``.

Importing this module registers the handlers with kopf's default registry.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.api.contract import (
    FINETUNEJOB_ANNOTATION,
    JOB_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Reason,
)
from kubetune.api.manifest import format_validation_error
from kubetune.api.models import GROUP, PLURAL, VERSION, FineTuneJobSpec
from kubetune.api.timestamps import rfc3339
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import Kube, collection_path, finetunejob_path, load_config
from kubetune.operator.policy import policy_problems
from kubetune.operator.render import (
    child_names,
    pvc_claims,
    render,
    short_name,
)
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import (
    FAILED,
    READY,
    derive_status,
    set_condition,
    transition,
    ttl_remaining,
)

SETTINGS = OperatorSettings()
_FINISHED = ("Succeeded", "Failed")
_MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}

_kube: Kube | None = None
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def kube() -> Kube:
    global _kube  # noqa: PLW0603 - one API client per process, made at startup
    if _kube is None:
        _kube = Kube(load_config())
    return _kube


@contextmanager
def _serialized(namespace: str, name: str) -> Iterator[None]:
    """Job and Pod events of one FineTuneJob arrive on different workers: derive one at a time."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


def _now() -> datetime:
    return datetime.now(UTC)


# --- startup -----------------------------------------------------------------------------------


@kopf.on.startup()  # type: ignore[untyped-decorator]
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events are posted on purpose (one per transition); handler logs stay logs.
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.execution.max_workers = SETTINGS.max_workers
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    # Deletion waits for a running timer to exit; the TTL timer deletes its own FineTuneJob, so
    # look again soon rather than after kopf's default of a minute.
    settings.background.cancellation_polling = 2
    logger.info(
        "kubetune operator: watching %s",
        ", ".join(SETTINGS.namespaces) if SETTINGS.namespaces else "all namespaces",
    )


# --- the FineTuneJob ---------------------------------------------------------------------------


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    with api_errors(f"patching the status of {namespace}/{name}"):
        kube().merge_patch(finetunejob_path(namespace, name, "status"), {"status": status})


def _reject(body: kopf.Body, reason: str, problems: list[str]) -> kopf.PermanentError:
    """Mark the FineTuneJob Failed for a problem no retry can fix; the error to raise."""
    message = "; ".join(problems)
    now = _now()
    conditions = body.get("status", {}).get("conditions") or []
    generation = body["metadata"].get("generation")
    for type_, value in ((READY, False), (FAILED, True)):
        conditions = set_condition(
            conditions, type_, value, reason=reason, message=message, now=now, generation=generation
        )
    _patch_status(
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        {
            "phase": "Failed",
            "observedGeneration": generation,
            "conditions": conditions,
            "completionTime": body.get("status", {}).get("completionTime") or rfc3339(now),
            "result": {"outcome": "Failed", "reason": reason, "message": message[:1024]},
        },
    )
    kopf.event(body, type="Warning", reason=reason, message=message[:1024])
    return kopf.PermanentError(f"{reason}: {message}")


def missing_references(namespace: str, spec: FineTuneJobSpec) -> list[str]:
    """PVCs the spec names that don't exist in ``namespace``. Secrets are not looked at: the
    operator may not read them, and a missing one shows on the trainer pod instead."""
    missing: list[str] = []
    api = kube()
    for claim in pvc_claims(spec):
        path = f"{collection_path('v1', 'PersistentVolumeClaim', namespace)}/{claim}"
        with api_errors(f"reading PersistentVolumeClaim {namespace}/{claim}"):
            if api.get_or_none(path) is None:
                missing.append(f"PersistentVolumeClaim {claim!r} not found")
    return missing


@kopf.on.resume(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
@kopf.on.create(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
def reconcile(
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    status: kopf.Status,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Validate beyond the schema, then create the children (each at most once)."""
    if status.get("phase") in _FINISHED:
        return  # A finished run is never started again, whatever happened to its Job.
    try:
        parsed = FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise _reject(
            body, Reason.INVALID_SPEC, format_validation_error(exc, FineTuneJobSpec)
        ) from exc
    denied = policy_problems(parsed, SETTINGS)
    if denied:
        raise _reject(body, Reason.DENIED, denied)

    missing = missing_references(namespace, parsed)
    if missing:
        message = "; ".join(missing) + " (checked again every "
        message += f"{SETTINGS.reference_recheck_seconds:g}s)"
        ready: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == READY), {}
        )
        if ready.get("message") != message:
            generation = body["metadata"].get("generation")
            conditions = set_condition(
                status.get("conditions") or [],
                READY,
                False,
                reason=Reason.MISSING_REFERENCE,
                message=message,
                now=_now(),
                generation=generation,
            )
            _patch_status(
                namespace,
                name,
                {"phase": "Pending", "observedGeneration": generation, "conditions": conditions},
            )
            kopf.event(body, type="Warning", reason=Reason.MISSING_REFERENCE, message=message)
        raise kopf.TemporaryError(message, delay=SETTINGS.reference_recheck_seconds)

    metadata = {"name": name, "namespace": namespace, "uid": body["metadata"]["uid"]}
    created: list[str] = []
    for manifest in render(parsed, metadata, SETTINGS):
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
            raise _reject(body, reason, [f"{kind} {child}: {_api_message(refusal)}"]) from exc
        if not _owned_by(existing, metadata["uid"]):
            # A same-named object that isn't ours: never take it over silently.
            _delete_children(created)
            raise _reject(body, Reason.NAME_CONFLICT, [f"{kind} {child} exists and is not owned"])
        created.append(path)
    logger.info("children of %s/%s are in place", namespace, name)
    refresh(namespace, name)


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


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether ``uid`` is the controller owner of ``obj``: the only objects kubetune touches."""
    owners = obj.get("metadata", {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


def _delete_children(paths: list[str]) -> None:
    for path in reversed(paths):
        with api_errors(f"cleaning up {path}"):
            kube().delete(path)


def _patch_owned_job(namespace: str, name: str, uid: str, patch: dict[str, Any], what: str) -> bool:
    """Patch the job's Job if, and only if, this FineTuneJob owns it; False if it has none.

    The patch carries the resourceVersion that was checked, so an object replaced in between
    is a conflict (retried), never a write to someone else's Job."""
    path = collection_path("batch/v1", "Job", namespace) + "/" + child_names(name).job
    with api_errors(what):
        job = kube().get_or_none(path)
        if job is None or not _owned_by(job, uid):
            return False
        version = job["metadata"]["resourceVersion"]
        kube().merge_patch(path, {"metadata": {"resourceVersion": version}, **patch})
    return True


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.runPolicy.suspend")  # type: ignore[untyped-decorator]
def suspend_or_resume(
    old: Any, new: Any, name: str, namespace: str, body: kopf.Body, **_: Any
) -> None:
    """spec.runPolicy.suspend → the Job's spec.suspend (a queued Job stays with Kueue)."""
    if old is None and not new:
        return
    suspend = bool(new)
    if not suspend and body.get("spec", {}).get("scheduling", {}).get("queueName"):
        return  # Kueue admits the Job by unsuspending it.
    what = f"{'suspending' if suspend else 'resuming'} the Job of {namespace}/{name}"
    patch = {"spec": {"suspend": suspend}}
    if _patch_owned_job(namespace, name, body["metadata"]["uid"], patch, what):
        refresh(namespace, name)


@kopf.on.field(  # type: ignore[untyped-decorator]
    GROUP, VERSION, PLURAL, field="spec.runPolicy.activeDeadlineSeconds"
)
def change_deadline(
    old: Any, new: Any, name: str, namespace: str, body: kopf.Body, **_: Any
) -> None:
    if old is None or new is None:
        return
    patch = {"spec": {"activeDeadlineSeconds": int(new)}}
    what = f"changing the deadline of the Job of {namespace}/{name}"
    _patch_owned_job(namespace, name, body["metadata"]["uid"], patch, what)


@kopf.on.update(GROUP, VERSION, PLURAL)  # type: ignore[untyped-decorator]
def spec_changed(name: str, namespace: str, status: kopf.Status, **_: Any) -> None:
    """Allowed edits (scheduling, runPolicy) are acted on above; record the generation seen."""
    if status.get("jobName"):
        refresh(namespace, name)


@kopf.timer(  # type: ignore[untyped-decorator]
    GROUP, VERSION, PLURAL, interval=SETTINGS.status_recheck_seconds, initial_delay=5
)
def housekeeping(
    spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, logger: kopf.Logger, **_: Any
) -> None:
    """Catch up on missed events while running; delete finished jobs after their TTL."""
    if status.get("phase") not in _FINISHED:
        if status.get("jobName"):
            refresh(namespace, name)
        return
    ttl = spec.get("runPolicy", {}).get("ttlSecondsAfterFinished")
    remaining = ttl_remaining(status, ttl, _now())
    if remaining is not None and remaining <= 0:
        logger.info("ttlSecondsAfterFinished (%ss) passed: deleting %s/%s", ttl, namespace, name)
        with api_errors(f"deleting {namespace}/{name} after its TTL"):
            kube().delete(finetunejob_path(namespace, name))


# --- the Job and its Pods → status -------------------------------------------------------------


def refresh(namespace: str, name: str) -> None:
    """Derive the FineTuneJob's status from its Job and Pods and write it when it changed."""
    api = kube()
    with _serialized(namespace, name), api_errors(f"refreshing the status of {namespace}/{name}"):
        ftj = api.get_or_none(finetunejob_path(namespace, name))
        if ftj is None or ftj["metadata"].get("deletionTimestamp"):
            return
        job_name = child_names(name).job
        job = api.get_or_none(f"{collection_path('batch/v1', 'Job', namespace)}/{job_name}")
        if job is None:
            return
        if not _owned_by(job, ftj["metadata"]["uid"]):
            return
        pods = api.get(
            collection_path("v1", "Pod", namespace),
            query={"labelSelector": f"{JOB_LABEL}={short_name(name)},job-name={job_name}"},
        ).get("items", [])
        old = ftj.get("status") or {}
        new = derive_status(ftj, job, pods, _now())
        if all(old.get(key) == value for key, value in new.items()):
            return
        api.merge_patch(finetunejob_path(namespace, name, "status"), {"status": new})
    change = transition(old, new)
    if change is not None:
        kind, reason, message = change
        kopf.event(ftj, type=kind, reason=reason, message=message[:1024])


def _owner_name(annotations: kopf.Annotations) -> str | None:
    value = annotations.get(FINETUNEJOB_ANNOTATION)
    return str(value) if value else None


@kopf.on.event("batch", "v1", "jobs", labels=_MANAGED)  # type: ignore[untyped-decorator]
def job_changed(
    type: str | None,
    annotations: kopf.Annotations,
    namespace: str,
    **_: Any,
) -> None:
    name = _owner_name(annotations)
    if name is not None and type != "DELETED":
        refresh(namespace, name)


@kopf.on.event("", "v1", "pods", labels=_MANAGED)  # type: ignore[untyped-decorator]
def pod_changed(
    type: str | None,
    annotations: kopf.Annotations,
    namespace: str,
    **_: Any,
) -> None:
    name = _owner_name(annotations)
    if name is not None:
        refresh(namespace, name)
