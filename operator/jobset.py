"""A multi-pod group run by JobSet (``KUBETUNE_GROUP_WORKLOAD=jobset``). Pure: data in, data out.

A JobSet (jobset.x-k8s.io) of one replicatedJob, ``node``, replicas 1, whose Job template is the
group's Indexed Job: the JobSet controller makes the headless Service, restarts the whole group
(it deletes the child Job and makes it again, up to ``failurePolicy.maxRestarts``) and marks the
JobSet Completed or Failed. ``group_view`` shows that JobSet and its current child Job as the one
Job of a group attempt that ``status.derive_status`` already reads for the operator's own
Indexed Jobs, so both backends report the same phases, reasons and messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.contract import ATTEMPT_ANNOTATION, FINETUNEJOB_ANNOTATION, KUEUE_QUEUE_LABEL
from kubetune.operator.objects import Manifest, Obj

if TYPE_CHECKING:
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.operator.names import ChildNames


GROUP: Final = "jobset.x-k8s.io"
VERSION: Final = "v1alpha2"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "JobSet"
PLURAL: Final = "jobsets"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
#: The one replicatedJob: its Job is ``<jobset>-node-0``, whose pods' host names are
#: ``<jobset>-node-0-<node rank>``.
REPLICATED_JOB: Final = "node"
#: The JobSet controller's label on each child Job (and its pods): the JobSet restart it
#: belongs to (``status.restarts`` when it was made).
RESTART_LABEL: Final = "jobset.sigs.k8s.io/restart-attempt"
#: The failure reasons of a child Job that no restart can fix: a rank exited with a
#: non-retriable code (the Job's podFailurePolicy), or the run's deadline passed.
FINAL_JOB_FAILURES: Final = ("PodFailurePolicy", "DeadlineExceeded")


def child_job_name(jobset_name: str) -> str:
    """The name the JobSet controller gives the group's Job (``<jobset>-<replicatedJob>-0``)."""
    return f"{jobset_name}-{REPLICATED_JOB}-0"


def pod_host(jobset_name: str, rank: int) -> str:
    """The host name of node rank ``rank``'s pod: the Job controller's ``<job>-<index>``."""
    return f"{child_job_name(jobset_name)}-{rank}"


def _true(obj: Obj, *types: str) -> Obj | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return dict(condition)
    return None


def restarts(jobset: Obj) -> int:
    return int((jobset.get("status") or {}).get("restarts") or 0)


def restart_of(job: Obj) -> int | None:
    value = ((job.get("metadata") or {}).get("labels") or {}).get(RESTART_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


def child_jobs(jobset: Obj, jobs: Sequence[Obj]) -> list[Obj]:
    """The Jobs whose controller owner is ``jobset``."""
    uid = (jobset.get("metadata") or {}).get("uid")
    return [
        job
        for job in jobs
        if any(
            o.get("uid") == uid and o.get("controller")
            for o in (job.get("metadata") or {}).get("ownerReferences") or []
        )
    ]


def current_job(jobset: Obj, jobs: Sequence[Obj]) -> Obj | None:
    """The child Job the status is read from: the current restart's, else (while the JobSet
    restarts, before it has made the next one) the newest earlier one."""
    children = [(restart_of(job), job) for job in child_jobs(jobset, jobs)]
    counted = [(n, job) for n, job in children if n is not None and n <= restarts(jobset)]
    if not counted:
        return None
    return max(counted, key=lambda item: item[0])[1]


def group_view(jobset: Obj, jobs: Sequence[Obj]) -> Obj:
    """The JobSet and its child Jobs as one group attempt's Job, for ``derive_status``.

    - the attempt (``kubetune.io/attempt``) is the child Job's restart + 1: ``status.attempts``
      is the JobSet's restarts + 1;
    - conditions: ``Complete`` once the JobSet is Completed; the child Job's own (``Failed``
      with ``BackoffLimitExceeded``, ``PodFailurePolicy``, ``DeadlineExceeded``) while it has
      them, so the operator's reasons and retry decisions are the ones it makes for its own
      Jobs; the JobSet's ``Failed`` when its Job is gone;
    - ``spec.suspend`` is the JobSet's (the child Job follows it);
    - the name is the child Job's, where its pods and logs are (``status.jobName``); it is
      being deleted while the JobSet replaces it (the group is retrying).
    """
    meta = jobset.get("metadata") or {}
    job = current_job(jobset, jobs)
    attempt = restarts(jobset) + 1 if job is None else (restart_of(job) or 0) + 1
    job_meta = dict((job or {}).get("metadata") or {})
    view_meta: dict[str, Any] = {
        **job_meta,
        "name": job_meta.get("name") or child_job_name(str(meta.get("name"))),
        "annotations": {ATTEMPT_ANNOTATION: str(attempt)},
        "creationTimestamp": meta.get("creationTimestamp"),
    }
    # Not the child's resourceVersion or owner: nothing patches the view, and nothing reads it
    # as an object the FineTuneJob owns. Its uid stays: the pods are the child Job's own.
    for key in ("resourceVersion", "ownerReferences"):
        view_meta.pop(key, None)
    if meta.get("deletionTimestamp"):
        view_meta["deletionTimestamp"] = meta["deletionTimestamp"]
    conditions: list[Obj] = list(((job or {}).get("status") or {}).get("conditions") or [])
    completed = _true(jobset, "Completed")
    failed = _true(jobset, "Failed")
    if completed is not None:
        conditions = [{"type": "Complete", "status": "True", "reason": completed.get("reason")}]
    elif failed is not None and not any(
        c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"
        for c in conditions
    ):
        conditions = [{**failed, "type": "Failed"}]
    job_status = dict((job or {}).get("status") or {})
    return {
        "metadata": view_meta,
        "spec": {"suspend": bool((jobset.get("spec") or {}).get("suspend"))},
        "status": {
            "conditions": conditions,
            **(
                {"completionTime": job_status["completionTime"]}
                if completed is not None and job_status.get("completionTime")
                else {}
            ),
        },
    }


def restarting(jobset: Obj, jobs: Sequence[Obj]) -> bool:
    """The JobSet is between two attempts: it counted a restart, and that restart's Job isn't
    there yet (the previous one is being deleted, or the next is not made yet)."""
    if _true(jobset, "Completed", "Failed") is not None or restarts(jobset) == 0:
        return False
    job = current_job(jobset, jobs)
    return job is None or restart_of(job) != restarts(jobset)


def render_jobset(
    spec: FineTuneJobSpec, name: str, names: ChildNames, meta: Any, job: Manifest
) -> Manifest:
    """The group's JobSet: one replicatedJob whose Job template is the group's Indexed Job.

    JobSet does what the operator does for its own Indexed Jobs: the headless Service
    (``network``), the group restart (``failurePolicy``: the child Job is made again, every pod
    with it, up to ``runPolicy.backoffLimit`` times), except where a restart can't help (a rank's
    non-retriable exit, the deadline). Every field JobSet's defaulting webhook would set is set
    here, so the JobSet is the same whether or not that webhook runs.
    """
    queue = spec.scheduling.queue_name
    # As for a Job: created suspended, it is handed to Kueue (labelled) only when resumed.
    queued = queue and not spec.run_policy.suspend
    metadata = meta(names.jobset, {KUEUE_QUEUE_LABEL: queue} if queued else {})
    job_spec = dict(job["spec"])
    # The JobSet's suspend is the child Job's (its controller sets it there).
    suspend = job_spec.pop("suspend")
    job_labels = {k: v for k, v in job["metadata"]["labels"].items() if k != KUEUE_QUEUE_LABEL}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            # Kueue admits a queued JobSet by unsuspending it, all its pods as one Workload.
            "suspend": suspend,
            "network": {
                "enableDNSHostnames": True,
                "subdomain": names.jobset,
                # Ranks find rank 0 before any of them is Ready.
                "publishNotReadyAddresses": True,
            },
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "startupPolicy": {"startupPolicyOrder": "AnyOrder"},
            "failurePolicy": {
                "maxRestarts": spec.run_policy.backoff_limit,
                "restartStrategy": "Recreate",
                "rules": [
                    {
                        "name": "non-retriable",
                        "action": "FailJobSet",
                        "onJobFailureReasons": list(FINAL_JOB_FAILURES),
                        "targetReplicatedJobs": [REPLICATED_JOB],
                    }
                ],
            },
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": 1,
                    "template": {
                        # The child Job's labels and annotations: the operator's Job index
                        # finds it by them (and the queue label stays on the JobSet alone, so
                        # Kueue admits the JobSet, not its Job).
                        "metadata": {
                            "labels": job_labels,
                            "annotations": {FINETUNEJOB_ANNOTATION: name},
                        },
                        "spec": job_spec,
                    },
                }
            ],
        },
    }
