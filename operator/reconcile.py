"""What one reconcile of a FineTuneJob should do, decided from what exists. Pure: data in, plan out.

The operator is level-triggered: whatever the event (the FineTuneJob, its Job or one of its
Pods changed, a periodic resync, a replica taking over), it looks at the FineTuneJob and the
children it owns, as the watch caches hold them, and ``plan`` says what to change. The handlers
carry the plan out; nothing here calls the API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from kubetune.api.contract import KUEUE_QUEUE_LABEL, ConditionType, Reason
from kubetune.api.manifest import format_validation_error
from kubetune.api.models import FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.timestamps import parse_rfc3339, rfc3339
from kubetune.operator import jobset as js
from kubetune.operator.names import child_names
from kubetune.operator.outcome import (
    group_restart_due,
    nodes_of,
    validation_estimate,
    validation_succeeded,
)
from kubetune.operator.pods import pod_started_at, trainer_finished_at
from kubetune.operator.policy import policy_problems
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import derive_status, set_condition, ttl_remaining

Obj = Mapping[str, Any]

FINISHED: Final = ("Succeeded", "Failed")
#: The longest a status change that only marks a step on the way (``_hold``) waits to be written
#: with the next phase: each such write is a patch per job, plus the watch events it causes.
STEP_HOLD_SECONDS: Final = 10.0
#: Ready reasons of a job's first steps, held (``_hold``) until the next one or a while passes.
_FIRST_STEPS: Final = frozenset({Reason.STARTING, Reason.VALIDATING})
#: Status fields that change as a pod starts, without a change of phase or reason.
_BOOKKEEPING: Final = frozenset({"podName", "attempts", "startTime", "conditions"})
#: Status fields the operator owns. ``progress`` is the trainer's: never written here.
OPERATOR_FIELDS: Final = frozenset(FineTuneJobStatus.model_fields) - {"progress"}
_ALIASES: Final = {
    name: info.alias or name for name, info in FineTuneJobStatus.model_fields.items()
}
OWNED_STATUS_KEYS: Final = frozenset(_ALIASES[name] for name in OPERATOR_FIELDS)


#: Marks a FineTuneJob whose spec holds only what the watch cache keeps
#: (``controller.FINETUNEJOB_SPEC_KEPT``): ``plan`` asks for the whole one (``Plan.fetch_spec``)
#: before it validates the spec or makes children from it.
PARTIAL_SPEC: Final = "kubetune.io/partial-spec"


@dataclass(frozen=True)
class Rejection:
    """A problem no retry can fix: the job fails with this reason before anything is made."""

    reason: str
    problems: tuple[str, ...]

    @property
    def message(self) -> str:
        return "; ".join(self.problems)


@dataclass(frozen=True)
class Plan:
    """One reconcile's work, in the order the handlers carry it out."""

    #: Fail the job now (InvalidSpec, Denied, NameConflict): the status to write, no children.
    reject: Rejection | None = None
    #: The validated spec, when the children are missing and must be created.
    create: FineTuneJobSpec | None = None
    #: The group attempt the created Job runs (a multi-pod group: one Job per attempt).
    attempt: int = 1
    #: A multi-pod group's attempt failed and may be retried: delete its Job (foreground, so the
    #: next attempt's Job is made only once every pod of this one is gone).
    delete_job: bool = False
    #: The validated spec, when the Validating phase's Job (and the companions) must be created.
    validate: FineTuneJobSpec | None = None
    #: A merge patch for the owned Job (suspend, deadline), made with its resourceVersion.
    job_patch: dict[str, Any] | None = None
    #: The name of the Job ``job_patch`` is for (the trainer's, or the validation Job).
    patched_job: str | None = None
    #: ``patched_job`` names the group's JobSet (``job_patch``: its suspend), not a Job.
    patched_jobset: bool = False
    #: A Job (or JobSet) Kueue manages: whether its Workload should be active (runPolicy.suspend
    #: on a queued job: Kueue owns its spec.suspend and would unsuspend an admitted one).
    workload_active: bool | None = None
    #: Only the status fields that changed (never ``progress``); None when nothing did.
    status_patch: dict[str, Any] | None = None
    #: The finished job's TTL ran out: delete the FineTuneJob.
    delete: bool = False
    #: Look again after this many seconds even without an event (TTL due, missing reference).
    requeue_after: float | None = None
    #: The FineTuneJob came from the cache with part of its spec (``PARTIAL_SPEC``), and this
    #: reconcile needs all of it: read it from the API and plan again.
    fetch_spec: bool = False
    #: Why, for the log.
    notes: tuple[str, ...] = field(default=())


def owned_by(obj: Obj, uid: str) -> bool:
    """Whether ``uid`` is the controller owner of ``obj``: the only objects kubetune touches."""
    owners = obj.get("metadata", {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


#: What of each companion kubetune renders and the pod relies on: compared with a companion that
#: existed before kubetune created it (whoever made it, with the job's uid as its owner). Keys
#: compared whole: what is there and kubetune doesn't render (extra data, Secrets of a service
#: account) counts as a difference too.
_COMPANION_CONTENT: Final = {
    "ConfigMap": ("data", "binaryData"),
    "ServiceAccount": ("automountServiceAccountToken", "secrets", "imagePullSecrets"),
    "Role": ("rules",),
    "RoleBinding": ("roleRef", "subjects"),
}
#: Kinds whose ``spec`` the apiserver defaults: kubetune's must be contained in the existing one.
_SPEC_KINDS: Final = frozenset({"NetworkPolicy", "Service"})


def companion_differs(rendered: Obj, existing: Obj) -> bool:
    """Whether ``existing`` (a companion found in place of ``rendered``) carries other content
    than kubetune rendered: then the rendered content must be written over it."""
    kind = str(rendered.get("kind"))
    if kind in _SPEC_KINDS:
        return not _contains(existing.get("spec"), rendered.get("spec"))
    return any(rendered.get(key) != existing.get(key) for key in _COMPANION_CONTENT.get(kind, ()))


def _contains(have: Any, want: Any) -> bool:
    """``want`` within ``have``: maps may have more keys (the apiserver's defaults), lists match
    item by item and in length, other values are equal."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            key in have and _contains(have[key], value) for key, value in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(_contains(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(have == want)


def _validation_job_name(ftj: Obj) -> str:
    return child_names(str(ftj.get("metadata", {}).get("name"))).validation_job


def owned_job(ftj: Obj, jobs: Sequence[Obj]) -> Obj | None:
    """The trainer Job (not the Validating phase's)."""
    uid = str(ftj.get("metadata", {}).get("uid"))
    validation = _validation_job_name(ftj)
    return next(
        (
            job
            for job in jobs
            if owned_by(job, uid) and job.get("metadata", {}).get("name") != validation
        ),
        None,
    )


def owned_validation_job(ftj: Obj, jobs: Sequence[Obj]) -> Obj | None:
    uid = str(ftj.get("metadata", {}).get("uid"))
    validation = _validation_job_name(ftj)
    return next(
        (
            job
            for job in jobs
            if owned_by(job, uid) and job.get("metadata", {}).get("name") == validation
        ),
        None,
    )


def owned_jobset(ftj: Obj, jobsets: Sequence[Obj]) -> Obj | None:
    """The group's JobSet (``KUBETUNE_GROUP_WORKLOAD=jobset``), if the FineTuneJob owns one."""
    uid = str(ftj.get("metadata", {}).get("uid"))
    return next((j for j in jobsets if owned_by(j, uid)), None)


def pods_of(job: Obj | None, pods: Sequence[Obj]) -> list[Obj]:
    """The Job's own pods (controller-owned by it), whatever their labels say."""
    if job is None:
        return []
    uid = str(job.get("metadata", {}).get("uid"))
    return [pod for pod in pods if owned_by(pod, uid)]


def status_changes(current: Obj, desired: Obj) -> dict[str, Any] | None:
    """The fields of ``desired`` that differ from ``current`` (only fields the operator owns)."""
    changed = {
        key: value
        for key, value in desired.items()
        if key in OWNED_STATUS_KEYS and current.get(key) != value
    }
    return changed or None


def rejected_status(ftj: Obj, rejection: Rejection, now: datetime) -> dict[str, Any]:
    """The status of a FineTuneJob failed for ``rejection``, built through the status model."""
    current = ftj.get("status") or {}
    generation = ftj.get("metadata", {}).get("generation")
    conditions: Sequence[Mapping[str, Any]] = current.get("conditions") or []
    for type_, value in ((ConditionType.READY, False), (ConditionType.FAILED, True)):
        conditions = set_condition(
            conditions,
            type_,
            value,
            reason=rejection.reason,
            message=rejection.message,
            now=now,
            generation=generation,
        )
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Failed",
            "observedGeneration": generation,
            "conditions": conditions,
            "completionTime": current.get("completionTime") or rfc3339(now),
            "result": {
                "outcome": "Failed",
                "reason": rejection.reason,
                "message": rejection.message[:1024],
            },
        }
    )
    return status.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


def validate(spec: Obj, settings: OperatorSettings) -> FineTuneJobSpec | Rejection:
    """The parsed spec, or why it can never run (InvalidSpec, Denied)."""
    try:
        parsed = FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        problems = format_validation_error(exc, FineTuneJobSpec, prefix="spec")
        return Rejection(Reason.INVALID_SPEC, tuple(problems))
    denied = policy_problems(parsed, settings)
    if denied:
        return Rejection(Reason.DENIED, tuple(denied))
    return parsed


def kueue_managed(job: Obj) -> bool:
    """Whether Kueue manages ``job`` (it carries the queue label): Kueue then owns its suspend."""
    return KUEUE_QUEUE_LABEL in (job.get("metadata", {}).get("labels") or {})


def desired_job_patch(
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
        pass  # Kueue admits by unsuspending and evicts by suspending: see desired_workload_active
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


def plan(
    ftj: Obj,
    jobs: Sequence[Obj],
    pods: Sequence[Obj],
    settings: OperatorSettings,
    now: datetime,
    *,
    jobsets: Sequence[Obj] = (),
) -> Plan:
    """What to do for ``ftj`` given the Jobs, Pods and JobSets the caches hold for it.

    ``jobs`` are the Jobs named for it (owned or not, its JobSet's too), ``pods`` the Pods that
    name it, ``jobsets`` the JobSets; ``ftj``'s status is the latest the operator knows (its own
    writes included).
    """
    metadata = ftj.get("metadata", {})
    if metadata.get("deletionTimestamp"):
        return Plan(notes=("being deleted",))
    status = ftj.get("status") or {}
    phase = status.get("phase")
    jobset = owned_jobset(ftj, jobsets)
    if jobset is not None:
        return _jobset_plan(ftj, jobset, jobs, pods, now)
    job = owned_job(ftj, jobs)

    if phase in FINISHED:
        # A finished run is never started again, whatever happened to its Job.
        changes = None
        if job is not None:
            changes = status_changes(status, derive_status(ftj, job, pods_of(job, pods), now))
        return _finished_plan(ftj, changes, now)

    if job is None:
        validation = owned_validation_job(ftj, jobs)
        if validation is not None and not validation_succeeded(validation):
            # The Validating phase runs (or failed): its status needs no more of the spec.
            return _validating_plan(ftj, validation, pods, now)
        if ftj.get(PARTIAL_SPEC):
            return Plan(fetch_spec=True, notes=("the whole spec is needed",))
        name = str(metadata.get("name"))
        checked = validate(ftj.get("spec") or {}, settings)
        if isinstance(checked, Rejection):
            return Plan(reject=checked)
        job_name = child_names(name, checked.resources.nodes).job
        foreign = [j for j in jobs if j.get("metadata", {}).get("name") == job_name]
        if foreign:
            # A same-named Job that isn't ours: never take it over, never touch it.
            return Plan(
                reject=Rejection(Reason.NAME_CONFLICT, (f"Job {job_name} exists and is not owned",))
            )
        if checked.validation.enabled:
            return _validation_plan(ftj, checked, jobs, pods, now)
        return Plan(create=checked, attempt=_next_attempt(status))

    own_pods = pods_of(job, pods)
    desired = derive_status(ftj, job, own_pods, now)
    if "estimate" not in status:
        # The Validating phase's estimate goes with the trainer Job's first status write.
        validation = owned_validation_job(ftj, jobs)
        if validation is not None and validation_succeeded(validation):
            estimate = validation_estimate(validation, pods_of(validation, pods))
            if estimate:
                desired["estimate"] = estimate
    restart = (
        nodes_of(ftj) > 1
        and not job.get("metadata", {}).get("deletionTimestamp")
        and group_restart_due(ftj, job, own_pods)
    )
    if restart:
        return Plan(
            status_patch=status_changes(status, desired),
            delete_job=True,
            notes=("group attempt failed: replacing its Job",),
        )
    changes = status_changes(status, desired)
    follow = Plan(
        job_patch=desired_job_patch(ftj, job, queue=_queue(ftj)),
        patched_job=str(job.get("metadata", {}).get("name")),
        workload_active=desired_workload_active(ftj, job),
    )
    hold = _hold(status, desired, changes, job=job, pods=own_pods, now=now)
    if hold is not None:
        # What changed is on its way to the next phase (the pod is starting, the Job's Complete
        # is due): it is written with that phase, in one patch, unless it takes long. The next
        # event of the pod or Job queues this job again at once.
        return replace(follow, requeue_after=hold)
    return replace(follow, status_patch=changes)


def _queue(ftj: Obj) -> str | None:
    queue = (ftj.get("spec", {}).get("scheduling") or {}).get("queueName")
    return str(queue) if queue else None


def _jobset_plan(
    ftj: Obj, jobset: Obj, jobs: Sequence[Obj], pods: Sequence[Obj], now: datetime
) -> Plan:
    """A group run by its JobSet: the status from the JobSet and its current Job's pods, and
    the JobSet's suspend following the runPolicy. JobSet restarts the group; nothing else is
    made, replaced or deleted here."""
    status = ftj.get("status") or {}
    view = js.group_view(jobset, jobs)
    own_pods = pods_of(view, pods)
    desired = derive_status(ftj, view, own_pods, now)
    changes = status_changes(status, desired)
    if status.get("phase") in FINISHED:
        return _finished_plan(ftj, changes, now)
    follow = Plan(
        job_patch=desired_job_patch(ftj, jobset, queue=_queue(ftj), deadline=False),
        patched_job=str(jobset.get("metadata", {}).get("name")),
        patched_jobset=True,
        workload_active=desired_workload_active(ftj, jobset),
    )
    if js.restarting(jobset, jobs) and js.current_job(jobset, jobs) is None:
        # Between the failed attempt's Job (gone) and the next one (not made yet): the status
        # says Retrying already, and says more once the next Job's pods are there.
        return replace(follow, requeue_after=1.0)
    hold = _hold(status, desired, changes, job=view, pods=own_pods, now=now)
    if hold is not None:
        return replace(follow, requeue_after=hold)
    return replace(follow, status_patch=changes)


def _finished_plan(ftj: Obj, changes: dict[str, Any] | None, now: datetime) -> Plan:
    """A finished job: only what its Job still changes in its status (never back from a finished
    phase), and its deletion once ``ttlSecondsAfterFinished`` has passed."""
    if changes is not None and changes.get("phase") not in (None, *FINISHED):
        changes = None
    ttl = (ftj.get("spec", {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    remaining = ttl_remaining(ftj.get("status") or {}, ttl, now)
    if remaining is not None and remaining <= 0:
        return Plan(status_patch=changes, delete=True, notes=("ttl passed",))
    return Plan(status_patch=changes, requeue_after=remaining)


def _next_attempt(status: Obj) -> int:
    """A group's next attempt follows the last one the status counted (one pod: always 1)."""
    return int(status.get("attempts") or 0) + 1


def _validation_plan(
    ftj: Obj, spec: FineTuneJobSpec, jobs: Sequence[Obj], pods: Sequence[Obj], now: datetime
) -> Plan:
    """The Validating phase: create its Job; while it runs (or fails), the status from it; once
    it has succeeded, its estimate into the status and the trainer Job created."""
    validation = owned_validation_job(ftj, jobs)
    if validation is None:
        name = _validation_job_name(ftj)
        if any(j.get("metadata", {}).get("name") == name for j in jobs):
            return Plan(
                reject=Rejection(Reason.NAME_CONFLICT, (f"Job {name} exists and is not owned",))
            )
        return Plan(validate=spec)
    if not validation_succeeded(validation):
        return _validating_plan(ftj, validation, pods, now)
    # Its estimate is written with the trainer Job's first status (see plan).
    status = ftj.get("status") or {}
    return Plan(create=spec, attempt=_next_attempt(status), notes=("validated",))


def _validating_plan(ftj: Obj, validation: Obj, pods: Sequence[Obj], now: datetime) -> Plan:
    """While the Validating phase's Job runs (or once it failed): the status from it, and its
    suspend following the run policy."""
    status = ftj.get("status") or {}
    own_pods = pods_of(validation, pods)
    desired = derive_status(ftj, validation, own_pods, now, validating=True)
    changes = status_changes(status, desired)
    follow = Plan(
        # Its deadline is the operator's (KUBETUNE_VALIDATION_ACTIVE_DEADLINE_SECONDS), set at
        # create; only suspend follows the run policy.
        job_patch=desired_job_patch(ftj, validation, deadline=False),
        patched_job=str(validation.get("metadata", {}).get("name")),
    )
    hold = _hold(status, desired, changes, job=validation, pods=own_pods, now=now)
    if hold is not None:
        return replace(follow, requeue_after=hold)
    return replace(follow, status_patch=changes)


def _ready_reason(status: Obj) -> str | None:
    ready = [c for c in status.get("conditions") or [] if c.get("type") == ConditionType.READY]
    return str(ready[0].get("reason")) if ready else None


def _hold(
    status: Obj,
    desired: Obj,
    changes: Mapping[str, Any] | None,
    *,
    job: Obj,
    pods: Sequence[Obj],
    now: datetime,
) -> float | None:
    """Seconds to wait before writing ``changes`` that only mark a step on the way (None: write
    them now). Three steps are held, each for at most ``STEP_HOLD_SECONDS``:

    - the first ``Validating`` of a new job, and the first ``Pending`` (``Starting``) of a job
      whose (validation or trainer) Job was just made: the validation pod usually passes, and
      the trainer's runs, within seconds, so New → Running is one write (and one Event), not
      three;
    - a pod that started but whose trainer doesn't run yet (only ``podName``, ``attempts``,
      ``startTime`` change, phase and reason stay): written with ``Running`` a moment later;
    - ``Finishing``: the trainer exited 0 and the Job isn't marked Complete yet (the Job
      controller takes well under a second): Running → Succeeded is one write, not two.

    A problem (Unschedulable, ImagePullBackOff, a failed attempt) is never held: its reason
    differs, and it is written at once.
    """
    if changes is None:
        return None
    reason = _ready_reason(desired)
    if status.get("phase") in (None, "Validating") and reason in _FIRST_STEPS:
        created = (job.get("metadata") or {}).get("creationTimestamp")
        since = parse_rfc3339(str(created)) if created else None
    elif reason == Reason.FINISHING and _ready_reason(status) != Reason.FINISHING:
        since = trainer_finished_at(pods)
    elif (
        set(changes) <= _BOOKKEEPING
        and desired.get("phase") == status.get("phase")
        and reason == _ready_reason(status)
    ):
        since = pod_started_at(pods)
    else:
        return None
    if since is None:
        return None
    left = STEP_HOLD_SECONDS - (now - since).total_seconds()
    return left if left > 0 else None
