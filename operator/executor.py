"""One reconcile of one FineTuneJob, in a worker thread: observe it once (its whole spec read
from the API only when the plan needs it), plan once (``planner.decide``), carry the plan out —
at most one create step, the owned Job's patch, one status patch (with the trainer's progress),
the deletions — and return the plan for the caller's requeue. A pass that creates a Job plans
no more: the new Job's watch event brings the next pass, which sees it (``Controller.created``).
"""

from __future__ import annotations

import kopf

from kubetune.operator import jobset as js
from kubetune.operator.children import PARTIAL_SPEC, Observed, observe
from kubetune.operator.controller import SETTINGS, Controller, job_logger, kube, now
from kubetune.operator.creation import create_children, status_of
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import collection_path, finetunejob_path
from kubetune.operator.kueue import set_workload_active
from kubetune.operator.names import owned_by
from kubetune.operator.objects import Ftj, Key, Obj
from kubetune.operator.planner import Plan, decide, needs_whole_spec
from kubetune.operator.writes import reject, write_status


def reconcile(
    ctl: Controller,
    key: Key,
    ftj: Ftj,
    jobs: list[Obj],
    pods: list[Obj],
    *,
    jobsets: list[Obj] | None = None,
    progress: Obj | None = None,
    planned: tuple[Observed, Plan | None] | None = None,
) -> Plan:
    """Carry out the plan for one FineTuneJob; what was done, for the caller's requeue.
    ``progress``: what its trainer reported last (``operator/progress.py``), written with this
    pass's status changes, in the same patch. ``planned``: what ``plan_cached`` made of the
    same objects a moment before (not planned again)."""
    seen, work = planned or plan_cached(ftj, jobs, pods, jobsets or ())
    if work is None:  # the plan needs the whole spec, read from the API
        whole = _whole(ftj)
        if whole is None:
            return Plan(notes=("gone or replaced",))  # its own events queue the new one
        seen = seen.with_ftj(whole)
        work = decide(seen, SETTINGS, now())
    if work.reject is not None:
        reject(ctl, key, seen.ftj, work.reject)
        return work
    if work.validate is not None or work.create is not None:
        created = _create(ctl, key, seen, work)
        if not created:
            return Plan(requeue_after=SETTINGS.reference_recheck_seconds)
    _follow(seen, work)
    patch = work.status_patch
    if progress is not None and not work.delete:
        patch = {**(patch or {}), "progress": progress}
    if patch is not None:
        write_status(ctl, key, seen.ftj, patch)
    _delete(key, seen, work)
    return work


def plan_cached(
    ftj: Ftj, jobs: list[Obj], pods: list[Obj], jobsets: list[Obj] | tuple[()]
) -> tuple[Observed, Plan | None]:
    """Observe and plan from the caches alone, on the event loop (pure, no API call); the plan
    None when it needs the whole spec from the API (``reconcile`` reads it on a worker thread)."""
    seen = observe(ftj, jobs, pods, jobsets)
    return seen, None if needs_whole_spec(seen) else decide(seen, SETTINGS, now())


def _create(ctl: Controller, key: Key, seen: Observed, work: Plan) -> bool:
    """The plan's one create step: the Validating phase's Job, or the trainer's Job (or JobSet),
    with the companions unless the Validating phase made them already. False: a reference is
    missing (said on the status; looked for again later)."""
    namespace, name = key
    log = job_logger(key)
    if work.validate is not None:
        job = create_children(ctl, key, seen.ftj, work.validate, validation=True)
        if job is not None:
            log.info("validating %s/%s in Job %s", namespace, name, job["metadata"]["name"])
        return job is not None
    assert work.create is not None
    # After the Validating phase the companions are in place: its Job was made only once
    # every one of them was.
    made = seen.validation is not None
    job = create_children(ctl, key, seen.ftj, work.create, work.attempt, companions=not made)
    if job is not None:
        log.info("children of %s/%s are in place", namespace, name)
    return job is not None


def _follow(seen: Observed, work: Plan) -> None:
    """The workload (or the validation Job) follows the run policy: its patch, its Kueue
    Workload."""
    ftj = seen.ftj
    if work.job_patch is not None:
        target = next(
            o
            for o in (seen.workload, seen.validation)
            if o is not None and o["metadata"]["name"] == work.patched_job
        )  # the plan patches an object it saw
        _patch_owned_job(ftj, target, work.job_patch, kind=work.patched_kind)
    if work.workload_active is not None and seen.workload is not None:
        # The Workload is Kueue's for the object it queues: the trainer's Job, or the JobSet.
        log = job_logger((ftj["metadata"]["namespace"], ftj["metadata"]["name"]))
        set_workload_active(kube(), ftj, dict(seen.workload), work.workload_active, log)


def _delete(key: Key, seen: Observed, work: Plan) -> None:
    """A failed group attempt's Job, or the FineTuneJob once its TTL has passed."""
    namespace, name = key
    log = job_logger(key)
    if work.delete_job:
        assert seen.workload is not None  # the plan deletes the trainer Job it saw
        log.info("group attempt of %s/%s failed: deleting its Job for the next", namespace, name)
        _delete_owned_job(dict(seen.workload))
    if work.delete:
        log.info("ttlSecondsAfterFinished passed: deleting %s/%s", namespace, name)
        with api_errors(f"deleting {namespace}/{name} after its TTL"):
            kube().delete(finetunejob_path(namespace, name))


def _whole(ftj: Ftj) -> Ftj | None:
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
        if status_of(exc.__cause__) not in (404, 409):
            raise


def _patch_owned_job(ftj: Ftj, job: Ftj, patch: Obj, kind: str = "Job") -> None:
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
