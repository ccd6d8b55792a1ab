"""Creating a FineTuneJob's children, each at most once: the references checked, the companions
side by side, the Job last; a 409 reads the existing object (taken only if owned, its content
rendered over it where it differs); a refusal fails the job and removes what this pass made."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import kopf
from kubernetes.client.exceptions import ApiException

from kubetune.api.contract import (
    Reason,
)
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.timestamps import parse_rfc3339
from kubetune.operator import jobset as js
from kubetune.operator import metrics
from kubetune.operator.companions import companion_differs, shared
from kubetune.operator.controller import (
    CREATE_THREADS,
    JOB_SPEC_KEPT,
    LOGGER,
    SETTINGS,
    Controller,
    Created,
    kube,
    now,
    slim,
)
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import collection_path
from kubetune.operator.names import owned_by, pvc_claims
from kubetune.operator.objects import Ftj, Key, Manifest, Obj
from kubetune.operator.render import render, render_validation
from kubetune.operator.status import Rejection
from kubetune.operator.writes import missing_reference, post_event, reject


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


def create_children(
    ctl: Controller,
    key: Key,
    ftj: Ftj,
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
            missing_reference(ctl, key, ftj, missing)
            return None
    metadata = {"name": name, "namespace": namespace, "uid": ftj["metadata"]["uid"]}
    if validation:
        children = render_validation(spec, metadata, SETTINGS, jobset=ctl.use_jobset)
    else:
        children = render(spec, metadata, SETTINGS, attempt, jobset=ctl.use_jobset)
        if spec.resources.nodes > 1 and attempt == 1 and _jobset_unavailable(ctl):
            post_event(ftj, "Warning", Reason.JOBSET_UNAVAILABLE, JOBSET_FALLBACK)
    *first, job_manifest = children
    # The namespace's shared policy is checked once a while, not for every job.
    first = [m for m in first if not (shared(m) and _checked_lately(ctl, namespace))]
    created: list[str] = []
    if companions:
        # The companions don't depend on each other: created side by side; the Job last (its
        # pod needs them all). Two round trips per job. One companion (most jobs: the
        # ConfigMap) is created on this thread: a hop to another would only cost CPU.
        made = map(_companion, first) if len(first) < 2 else _CHILDREN.map(_companion, first)
        _check_created(ctl, key, ftj, list(made), created)
        if any(shared(m) for m in first):
            assert ctl.shared_checked is not None
            ctl.shared_checked[namespace] = time.monotonic()
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
    ftj: Ftj,
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
        elif shared(manifest):
            continue  # the namespace's, not this job's: never deleted with what this pass made
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
        reason = Reason.INVALID_SPEC if status_of(refusal) == 422 else Reason.REJECTED
        what = f"{manifest['kind']} {manifest['metadata']['name']}: {_api_message(refusal)}"
        reject(ctl, key, ftj, Rejection(reason, (what,)))
        raise exc
    if foreign is not None:
        # A same-named object that isn't ours: never take it over silently.
        _delete_children(created)
        problem = f"{foreign['kind']} {foreign['metadata']['name']} exists and is not owned"
        rejection = Rejection(Reason.NAME_CONFLICT, (problem,))
        reject(ctl, key, ftj, rejection)
        raise kopf.PermanentError(f"{rejection.reason}: {rejection.message}")
    if temporary is not None:
        raise temporary  # what was made stays, and is found (409, ours) on the retry


#: How long the namespace's shared trainer policy, once checked, is taken to be in place.
SHARED_RECHECK_SECONDS: Final = 60.0


def _checked_lately(ctl: Controller, namespace: str) -> bool:
    assert ctl.shared_checked is not None
    checked = ctl.shared_checked.get(namespace)
    return checked is not None and time.monotonic() - checked < SHARED_RECHECK_SECONDS


def ensure_rendered(manifest: Obj) -> Obj | kopf.TemporaryError | kopf.PermanentError:
    """The object ``manifest`` renders, read (one GET), made if missing, and given exactly the
    rendered spec if it has another (whoever made or changed it: a narrower selector or a wider
    rule would let trainer pods out): the namespace's shared companion, or a policy put back
    (``operator/policy_restore.py``)."""
    kind, child = manifest["kind"], manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    path = f"{collection_path(manifest['apiVersion'], kind, namespace)}/{child}"
    try:
        with api_errors(f"reading {kind} {namespace}/{child}"):
            found = kube().get_or_none(path)
        if found is None:
            with api_errors(f"creating {kind} {namespace}/{child}"):
                found, _ = kube().create_or_existing(manifest)
        if found.get("spec") != manifest["spec"]:
            found = _write_over(manifest, found)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        return exc
    return found


def _write_over(manifest: Obj, found: Obj) -> Manifest:
    """Replace ``found`` (at the resourceVersion read) with the rendered ``manifest``."""
    kind, child = manifest["kind"], manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    LOGGER.warning(
        "%s %s/%s was not as rendered: writing the rendered content over it", kind, namespace, child
    )
    with api_errors(f"replacing {kind} {namespace}/{child}"):
        return kube().replace(manifest, str(found["metadata"]["resourceVersion"]))


#: Creates the companions of a Job side by side (shared by all workers).
_CHILDREN = ThreadPoolExecutor(CREATE_THREADS, thread_name_prefix="create")


def _create_child(
    manifest: Obj, *, answer: bool = True
) -> tuple[Obj, str, Obj | kopf.TemporaryError | kopf.PermanentError]:
    """Create one child (409: the existing object, whoever owns it). A companion that existed
    already, owned by this job, gets the rendered content written over it: anyone who may create
    ConfigMaps or NetworkPolicies in the namespace could have made it first, with the job's uid
    as its owner, and the pod must never run on content kubetune didn't render. Without
    ``answer``, a child this request made is not read back: it is what was sent (its owner
    too), and only the Job's answer is kept (``Controller.created``)."""
    kind, child = manifest["kind"], manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    path = f"{collection_path(manifest['apiVersion'], kind, namespace)}/{child}"
    if shared(manifest):
        return manifest, path, ensure_rendered(manifest)
    try:
        with api_errors(f"creating {kind} {namespace}/{child}"):
            found, created = kube().create_or_existing(manifest, read_answer=answer)
        if created and not answer:
            return manifest, path, manifest
        owners = manifest["metadata"].get("ownerReferences") or [{}]
        uid = str(owners[0].get("uid"))
        if not created and owned_by(found, uid) and companion_differs(manifest, found):
            found = _write_over(manifest, found)
        return manifest, path, found
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        return manifest, path, exc


def _companion(
    manifest: Obj,
) -> tuple[Obj, str, Obj | kopf.TemporaryError | kopf.PermanentError]:
    """``_create_child`` for a companion: its answer is not parsed."""
    return _create_child(manifest, answer=False)


def status_of(error: BaseException | None) -> int | None:
    return error.status if isinstance(error, ApiException) else None


def _api_message(error: BaseException | None) -> str:
    """The apiserver's own words for a refusal (its Status message), else the HTTP reason."""
    if isinstance(error, ApiException):
        try:
            return str(json.loads(error.body or "{}").get("message") or error.reason)
        except (ValueError, AttributeError):  # not JSON, or JSON but no Status object
            return str(error.reason)
    return str(error)


def _delete_children(paths: Iterable[str]) -> None:
    for path in reversed(list(paths)):
        with api_errors(f"cleaning up {path}"):
            kube().delete(path)


#: Why a group runs as an Indexed Job though the settings ask for JobSet (startup log, Event).
JOBSET_FALLBACK = (
    f"KUBETUNE_GROUP_WORKLOAD=jobset, but JobSet's CRD ({js.CRD_NAME}) is not installed: "
    "multi-pod groups run as Indexed Jobs with a headless Service, restarted by the operator "
    "(install JobSet, then restart the operator)"
)


def _jobset_unavailable(ctl: Controller) -> bool:
    return SETTINGS.group_workload == "jobset" and not ctl.use_jobset
