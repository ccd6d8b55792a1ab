"""Kueue, for a FineTuneJob whose ``scheduling.queueName`` names a LocalQueue: which of its
workloads Kueue manages, whether their Workload should be active (the plan), and setting it (the
executor). A Job or JobSet is handed to Kueue by its queue label (``trainer_job``, ``jobset``);
the operator then leaves its ``spec.suspend`` to Kueue."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from kubetune.api.contract import KUEUE_QUEUE_LABEL
from kubetune.operator.children import owned_by
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import Kube, collection_path

Obj = Mapping[str, Any]

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
