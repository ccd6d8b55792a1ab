"""Kueue, and the run policy a workload follows: what of a Job or JobSet follows
``runPolicy`` (suspend, deadline) and when it is handed to a LocalQueue; which workloads Kueue
manages, whether their Workload should be active (the plan), and setting it (the executor). A
Job or JobSet is handed to Kueue by its queue label (``trainer_job``, ``jobset``); the operator
then leaves its ``spec.suspend`` to Kueue."""

from __future__ import annotations

import logging
from typing import Any, Final

from kubetune.api.contract import KUEUE_QUEUE_LABEL
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import Kube, collection_path
from kubetune.operator.names import owned_by
from kubetune.operator.objects import Obj

#: Kueue's Workload API, and the label it puts on the Workload of a Job (the Job's uid).
KUEUE_WORKLOADS: Final = "kueue.x-k8s.io/v1beta2"
KUEUE_JOB_UID_LABEL: Final = "kueue.x-k8s.io/job-uid"


def kueue_managed(job: Obj) -> bool:
    """Whether Kueue manages ``job`` (it carries the queue label): Kueue then owns its suspend."""
    return KUEUE_QUEUE_LABEL in (job.get("metadata", {}).get("labels") or {})


def desired_workload_active(ftj: Obj, job: Obj) -> bool | None:
    """For a Job Kueue manages, whether its Workload should be active: not while runPolicy.suspend
    is set (deactivating is how Kueue stops an admitted Job: it evicts it and releases its
    quota), and again once it is cleared after a suspension. None: nothing to check."""
    if not kueue_managed(job):
        return None
    suspend = bool((ftj.get("spec", {}).get("runPolicy") or {}).get("suspend", False))
    if suspend:
        return False
    if job.get("spec", {}).get("suspend") and (ftj.get("status") or {}).get("phase") == "Suspended":
        return True
    return None


def run_policy_patch(
    ftj: Obj, job: Obj, *, queue: str | None = None, deadline: bool = True
) -> dict[str, Any] | None:
    """What of the Job must follow the FineTuneJob's runPolicy (suspend, deadline; a JobSet's,
    without ``deadline``: only suspend, its Job's deadline is in its template). ``queue``: the
    LocalQueue the Job (or JobSet) goes to once it may run (the trainer's, of a queued job)."""
    run_policy = ftj.get("spec", {}).get("runPolicy") or {}
    job_spec = job.get("spec", {})
    spec: dict[str, Any] = {}
    patch: dict[str, Any] = {}
    suspend = bool(run_policy.get("suspend", False))
    if kueue_managed(job):
        pass  # Kueue admits by unsuspending, evicts by suspending: desired_workload_active
    elif suspend and not job_spec.get("suspend"):
        spec["suspend"] = True
    elif not suspend and job_spec.get("suspend"):
        if queue:
            # Made suspended, now resumed: Kueue queues it, and unsuspends it once admitted.
            patch["metadata"] = {"labels": {KUEUE_QUEUE_LABEL: queue}}
        else:
            spec["suspend"] = False
    seconds = run_policy.get("activeDeadlineSeconds")
    if deadline and seconds is not None and job_spec.get("activeDeadlineSeconds") != int(seconds):
        spec["activeDeadlineSeconds"] = int(seconds)
    if spec:
        patch["spec"] = spec
    return patch or None


def queue_of(ftj: Obj) -> str | None:
    """The LocalQueue the FineTuneJob names (``scheduling.queueName``), if any."""
    queue = (ftj.get("spec", {}).get("scheduling") or {}).get("queueName")
    return str(queue) if queue else None


def set_workload_active(
    client: Kube, ftj: Obj, job: Obj, active: bool, log: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    """Set ``spec.active`` of the Workload Kueue made for the FineTuneJob's ``job`` (Kueue's way
    to stop an admitted Job and to queue it again); nothing while Kueue hasn't made one yet."""
    if not owned_by(job, str(ftj["metadata"]["uid"])):
        return
    namespace, name = ftj["metadata"]["namespace"], ftj["metadata"]["name"]
    uid = str(job["metadata"]["uid"])
    path = collection_path(KUEUE_WORKLOADS, "Workload", namespace)
    with api_errors(f"reading the Kueue Workload of {namespace}/{name}"):
        found = client.get(path, {"labelSelector": f"{KUEUE_JOB_UID_LABEL}={uid}"})
    for workload in found.get("items") or []:
        if not owned_by(workload, uid) or workload.get("spec", {}).get("active", True) == active:
            continue
        meta = workload["metadata"]
        with api_errors(f"{'activating' if active else 'deactivating'} {meta['name']} of {name}"):
            client.merge_patch(
                f"{path}/{meta['name']}",
                {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "spec": {"active": active},
                },
            )
        log.info(
            "Kueue Workload %s %s (runPolicy.suspend)",
            meta["name"],
            "activated" if active else "deactivated",
        )
