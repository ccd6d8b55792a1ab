"""One reconcile of one FineTuneJob, in a worker thread: carry out what ``reconcile.plan`` says
(create the children, patch the owned Job, patch the status fields that changed, post Events,
delete after the TTL), and nothing else."""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import kopf
from kubernetes.client.exceptions import ApiException

from kubetune.api.contract import (
    MANAGED_BY,
    ConditionType,
    Reason,
)
from kubetune.api.models import API_VERSION, KIND, FineTuneJobSpec
from kubetune.api.timestamps import parse_rfc3339, rfc3339
from kubetune.operator import jobset as js
from kubetune.operator import metrics
from kubetune.operator.controller import (
    JOB_SPEC_KEPT,
    LOGGER,
    SETTINGS,
    Controller,
    Created,
    Key,
    Obj,
    job_logger,
    kube,
    now,
    slim,
)
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import collection_path, finetunejob_path
from kubetune.operator.names import pvc_claims
from kubetune.operator.reconcile import (
    PARTIAL_SPEC,
    Plan,
    Rejection,
    companion_differs,
    owned_by,
    owned_job,
    owned_jobset,
    owned_validation_job,
    plan,
    rejected_status,
)
from kubetune.operator.render import render, render_validation
from kubetune.operator.status import set_condition, transition

# --- one reconcile (in a worker thread) ----------------------------------------------------------


def reconcile(
    ctl: Controller,
    key: Key,
    ftj: Obj,
    jobs: list[Obj],
    pods: list[Obj],
    *,
    jobsets: list[Obj] | None = None,
    progress: Obj | None = None,
) -> Plan:
    """Carry out the plan for one FineTuneJob; what was done, for the caller's requeue.
    ``progress``: what its trainer reported last (``operator/progress.py``), written with this
    pass's status changes, in the same patch."""
    namespace, name = key
    log = job_logger(key)
    jobsets = list(jobsets or [])  # and the JobSet this pass creates
    work = plan(ftj, jobs, pods, SETTINGS, now(), jobsets=jobsets)
    if work.fetch_spec:
        whole = _whole(ftj)
        if whole is None:
            return Plan(notes=("gone or replaced",))  # its own events queue the new one
        ftj = whole
        work = plan(ftj, jobs, pods, SETTINGS, now(), jobsets=jobsets)
    jobs = list(jobs)  # and the Jobs this pass creates
    if work.reject is not None:
        _reject(ctl, key, ftj, work.reject)
        return work
    if work.validate is not None:
        job = _create_children(ctl, key, ftj, work.validate, validation=True)
        if job is None:
            return Plan(requeue_after=SETTINGS.reference_recheck_seconds)
        log.info("validating %s/%s in Job %s", namespace, name, job["metadata"]["name"])
        jobs.append(job)
        work = plan(ftj, jobs, pods, SETTINGS, now(), jobsets=jobsets)
    if work.create is not None:
        # After the Validating phase the companions are in place: its Job was made only once
        # every one of them was.
        made = owned_validation_job(ftj, jobs) is not None
        job = _create_children(ctl, key, ftj, work.create, work.attempt, companions=not made)
        if job is None:
            return Plan(requeue_after=SETTINGS.reference_recheck_seconds)
        log.info("children of %s/%s are in place", namespace, name)
        (jobsets if job.get("kind") == js.KIND else jobs).append(job)
        work = plan(ftj, jobs, pods, SETTINGS, now(), jobsets=jobsets)
    if work.job_patch is not None:
        job = next(
            j
            for j in (jobsets if work.patched_jobset else jobs)
            if owned_by(j, str(ftj["metadata"]["uid"]))
            and j["metadata"]["name"] == work.patched_job
        )
        _patch_owned_job(ftj, job, work.job_patch, kind=js.KIND if work.patched_jobset else "Job")
    if work.workload_active is not None:
        # The Workload is Kueue's for the object it queues: the trainer Job, or the JobSet.
        queued = owned_jobset(ftj, jobsets) if work.patched_jobset else owned_job(ftj, jobs)
        if queued is not None:
            _set_workload_active(ftj, dict(queued), work.workload_active)
    patch = work.status_patch
    if progress is not None and not work.delete:
        patch = {**(patch or {}), "progress": progress}
    if patch is not None:
        _write_status(ctl, key, ftj, patch)
    if work.delete_job:
        failed = owned_job(ftj, jobs)
        assert failed is not None  # the plan deletes the trainer Job it saw
        log.info("group attempt of %s/%s failed: deleting its Job for the next", namespace, name)
        _delete_owned_job(dict(failed))
    if work.delete:
        log.info("ttlSecondsAfterFinished passed: deleting %s/%s", namespace, name)
        with api_errors(f"deleting {namespace}/{name} after its TTL"):
            kube().delete(finetunejob_path(namespace, name))
    return work


def _whole(ftj: Obj) -> Obj | None:
    """``ftj`` with its whole spec, read from the API (the cache keeps only part of it); None
    when it is gone, or is another object of the same name now."""
    metadata = ftj["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    with api_errors(f"reading {namespace}/{name}"):
        found = kube().get_or_none(finetunejob_path(namespace, name))
    if found is None or found["metadata"].get("uid") != metadata.get("uid"):
        return None
    fresh = found["metadata"]
    whole = {key: value for key, value in ftj.items() if key != PARTIAL_SPEC}
    whole["metadata"] = {
        **metadata,
        "generation": fresh.get("generation"),
        "resourceVersion": fresh.get("resourceVersion"),
    }
    whole["spec"] = found.get("spec") or {}
    return whole


def _write_status(ctl: Controller, key: Key, ftj: Obj, changes: Obj) -> None:
    """Merge-patch only ``changes`` (never progress); post an Event when the phase moves."""
    namespace, name = key
    old = ftj.get("status") or {}
    with api_errors(f"patching the status of {namespace}/{name}"):
        kube().merge_patch(finetunejob_path(namespace, name, "status"), {"status": changes})
    assert ctl.written is not None
    # Progress is not in the index (nor read by a plan): only the operator's own fields.
    owned = {k: v for k, v in changes.items() if k != "progress"}
    if owned:
        ctl.written[key] = {**ctl.written.get(key, {}), **owned}
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
    stamp = rfc3339(now())
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
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    # Off the reconcile's path: its timestamps keep the order, a slow POST holds no worker.
    _EVENTS.submit(_post, event)


#: Posts Events in the background.
_EVENTS = ThreadPoolExecutor(4, thread_name_prefix="event")


def _post(event: Obj) -> None:
    namespace = event["metadata"]["namespace"]
    try:
        kube().request("POST", collection_path("v1", "Event", namespace), body=event)
    except Exception as exc:  # an Event is best effort
        name = event["involvedObject"]["name"]
        LOGGER.warning("posting the event %s on %s: %s", event["reason"], name, exc)


def _reject(ctl: Controller, key: Key, ftj: Obj, rejection: Rejection) -> None:
    """Fail the FineTuneJob for a problem no retry can fix (no children are made)."""
    status = rejected_status(ftj, rejection, now())
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
        now=now(),
        generation=generation,
    )
    _write_status(
        ctl,
        key,
        ftj,
        {"phase": "Pending", "observedGeneration": generation, "conditions": conditions},
    )


def _create_children(
    ctl: Controller,
    key: Key,
    ftj: Obj,
    spec: FineTuneJobSpec,
    attempt: int = 1,
    *,
    validation: bool = False,
    companions: bool = True,
) -> Obj | None:
    """Create every child, each at most once (409 → the existing one, if it is ours); the Job
    (the trainer's, or with ``validation`` the Validating phase's), or None when a reference is
    missing. Refused creates fail the job and remove what this pass made. Without
    ``companions``, only the Job: the rest was made (and checked) with an earlier one."""
    namespace, name = key
    if companions:
        missing = missing_references(namespace, spec)
        if missing:
            _missing_reference(ctl, key, ftj, missing)
            return None
    metadata = {"name": name, "namespace": namespace, "uid": ftj["metadata"]["uid"]}
    if validation:
        children = render_validation(spec, metadata, SETTINGS, jobset=ctl.use_jobset)
    else:
        children = render(spec, metadata, SETTINGS, attempt, jobset=ctl.use_jobset)
        if spec.resources.nodes > 1 and attempt == 1 and _jobset_unavailable(ctl):
            post_event(ftj, "Warning", Reason.JOBSET_UNAVAILABLE, JOBSET_FALLBACK)
    *first, job_manifest = children
    created: list[str] = []
    if companions:
        # The companions don't depend on each other: created side by side; the Job last (its
        # pod needs them all). Two round trips per job.
        _check_created(ctl, key, ftj, list(_CHILDREN.map(_create_child, first)), created)
    # Only when every companion is ours and in place: a Job whose pod could mount someone
    # else's ConfigMap or run as someone else's ServiceAccount is never made, not even briefly.
    results = [_create_child(job_manifest)]
    _check_created(ctl, key, ftj, results, created)
    _, _, job = results[0]
    assert isinstance(job, dict) and ctl.created is not None
    ctl.created[key] = slim(job, JOB_SPEC_KEPT)
    stamp = ftj["metadata"].get("creationTimestamp")
    if stamp and job["metadata"].get("uid"):
        delay = (now() - parse_rfc3339(str(stamp))).total_seconds()
        metrics.CREATE_TO_JOB_SECONDS.observe(max(delay, 0.0))
    return job


def _check_created(
    ctl: Controller,
    key: Key,
    ftj: Obj,
    results: list[Created],
    created: list[str],
) -> None:
    """Add what was created to ``created``; on a refusal or a foreign object, fail the job and
    delete everything this pass made; on a temporary error, raise it (retried)."""
    uid = str(ftj["metadata"]["uid"])
    temporary: kopf.TemporaryError | None = None
    refused: tuple[Obj, kopf.PermanentError] | None = None
    foreign: Obj | None = None
    for manifest, path, outcome in results:
        if isinstance(outcome, kopf.TemporaryError):
            temporary = temporary or outcome
        elif isinstance(outcome, kopf.PermanentError):
            refused = refused or (manifest, outcome)
        elif not owned_by(outcome, uid):
            foreign = foreign or manifest
        else:
            created.append(path)
    if refused is not None:
        # The API refused what the spec asked for (an invalid value, a quota, an admission
        # policy): say so on the job, and leave nothing half-made behind.
        _delete_children(created)
        manifest, exc = refused
        refusal = exc.__cause__
        reason = Reason.INVALID_SPEC if _status_of(refusal) == 422 else Reason.REJECTED
        what = f"{manifest['kind']} {manifest['metadata']['name']}: {_api_message(refusal)}"
        _reject(ctl, key, ftj, Rejection(reason, (what,)))
        raise exc
    if foreign is not None:
        # A same-named object that isn't ours: never take it over silently.
        _delete_children(created)
        problem = f"{foreign['kind']} {foreign['metadata']['name']} exists and is not owned"
        rejection = Rejection(Reason.NAME_CONFLICT, (problem,))
        _reject(ctl, key, ftj, rejection)
        raise kopf.PermanentError(f"{rejection.reason}: {rejection.message}")
    if temporary is not None:
        raise temporary  # what was made stays, and is found (409, ours) on the retry


#: Creates the companions of a Job side by side (shared by all workers).
_CHILDREN = ThreadPoolExecutor(32, thread_name_prefix="create")


def _create_child(
    manifest: Obj,
) -> tuple[Obj, str, Obj | kopf.TemporaryError | kopf.PermanentError]:
    """Create one child (409: the existing object, whoever owns it). A companion that existed
    already, owned by this job, gets the rendered content written over it: anyone who may create
    ConfigMaps or NetworkPolicies in the namespace could have made it first, with the job's uid
    as its owner, and the pod must never run on content kubetune didn't render."""
    kind, child = manifest["kind"], manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    path = f"{collection_path(manifest['apiVersion'], kind, namespace)}/{child}"
    try:
        with api_errors(f"creating {kind} {namespace}/{child}"):
            found, created = kube().create_or_existing(manifest)
        owners = manifest["metadata"].get("ownerReferences") or [{}]
        uid = str(owners[0].get("uid"))
        if not created and owned_by(found, uid) and companion_differs(manifest, found):
            LOGGER.warning(
                "%s %s/%s was not as rendered: writing the rendered content over it",
                kind, namespace, child,
            )  # fmt: skip
            with api_errors(f"replacing {kind} {namespace}/{child}"):
                found = kube().replace(manifest, str(found["metadata"]["resourceVersion"]))
        return manifest, path, found
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        return manifest, path, exc


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


def _delete_owned_job(job: Obj) -> None:
    """Delete this Job (by uid: never a same-named successor), its pods first (foreground)."""
    meta = job["metadata"]
    path = collection_path("batch/v1", "Job", meta["namespace"]) + "/" + meta["name"]
    body = {
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "propagationPolicy": "Foreground",
        "preconditions": {"uid": meta["uid"]},
    }
    try:
        with api_errors(f"deleting the failed Job {meta['namespace']}/{meta['name']}"):
            kube().request("DELETE", path, body=body)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        # Gone already, or replaced (a uid precondition that fails is a 409): nothing to do.
        if _status_of(exc.__cause__) not in (404, 409):
            raise


#: Kueue's Workload API, and the label it puts on the Workload of a Job (the Job's uid).
KUEUE_WORKLOADS: Final = "kueue.x-k8s.io/v1beta2"
KUEUE_JOB_UID_LABEL: Final = "kueue.x-k8s.io/job-uid"


def _set_workload_active(ftj: Obj, job: Obj, active: bool) -> None:
    """Set ``spec.active`` of the Workload Kueue made for the FineTuneJob's ``job`` (Kueue's way
    to stop an admitted Job and to queue it again); nothing while Kueue hasn't made one yet."""
    if not owned_by(job, str(ftj["metadata"]["uid"])):
        return
    namespace, name = ftj["metadata"]["namespace"], ftj["metadata"]["name"]
    uid = str(job["metadata"]["uid"])
    path = collection_path(KUEUE_WORKLOADS, "Workload", namespace)
    with api_errors(f"reading the Kueue Workload of {namespace}/{name}"):
        found = kube().get(path, {"labelSelector": f"{KUEUE_JOB_UID_LABEL}={uid}"})
    for workload in found.get("items") or []:
        if not owned_by(workload, uid) or workload.get("spec", {}).get("active", True) == active:
            continue
        meta = workload["metadata"]
        with api_errors(f"{'activating' if active else 'deactivating'} {meta['name']} of {name}"):
            kube().merge_patch(
                f"{path}/{meta['name']}",
                {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "spec": {"active": active},
                },
            )
        job_logger((namespace, name)).info(
            "Kueue Workload %s %s (runPolicy.suspend)",
            meta["name"],
            "activated" if active else "deactivated",
        )


#: Why a group runs as an Indexed Job though the settings ask for JobSet (startup log, Event).
JOBSET_FALLBACK = (
    f"KUBETUNE_GROUP_WORKLOAD=jobset, but JobSet's CRD ({js.CRD_NAME}) is not installed: "
    "multi-pod groups run as Indexed Jobs with a headless Service, restarted by the operator "
    "(install JobSet, then restart the operator)"
)


def _jobset_unavailable(ctl: Controller) -> bool:
    return SETTINGS.group_workload == "jobset" and not ctl.use_jobset


def _patch_owned_job(ftj: Obj, job: Obj, patch: Obj, kind: str = "Job") -> None:
    """Patch the Job (or the group's JobSet) the FineTuneJob owns, with the resourceVersion that
    was checked, so an object replaced in between is a conflict (retried), never a write to
    someone else's."""
    if not owned_by(job, str(ftj["metadata"]["uid"])):
        return
    namespace = ftj["metadata"]["namespace"]
    api_version = js.API_VERSION if kind == js.KIND else "batch/v1"
    path = collection_path(api_version, kind, namespace) + "/" + job["metadata"]["name"]
    version = job["metadata"]["resourceVersion"]
    what = f"updating the {kind} of {namespace}/{ftj['metadata']['name']}"
    with api_errors(what):
        kube().merge_patch(path, {"metadata": {"resourceVersion": version}, **patch})
