"""What one reconcile of a FineTuneJob should do, decided once from what it owns. Pure: data in,
a plan out.

The operator is level-triggered: whatever the event (the FineTuneJob, its Job or one of its
Pods changed, a periodic resync, a replica taking over), it observes the FineTuneJob and the
children it owns as the watch caches hold them (``children.observe``), and ``decide`` says what
to change: at most one create step (the Validating phase's Job, or the trainer's Job or JobSet,
with their companions), the owned Job's run-policy patch, the status fields that changed (one
patch), a deletion. ``executor.reconcile`` carries the plan out; nothing here calls the API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from kubetune.api.contract import ConditionType, Reason
from kubetune.api.manifest import format_validation_error
from kubetune.api.models import FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.timestamps import parse_rfc3339
from kubetune.operator import kueue
from kubetune.operator.backends import Backend
from kubetune.operator.children import Observed, observe
from kubetune.operator.names import child_names
from kubetune.operator.objects import Obj
from kubetune.operator.outcome import (
    group_restart_due,
    nodes_of,
    validation_estimate,
    validation_succeeded,
)
from kubetune.operator.pods import pod_started_at, trainer_finished_at
from kubetune.operator.policy import policy_problems
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import Rejection, derive_status, ttl_remaining

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


@dataclass(frozen=True)
class Plan:
    """One reconcile's work, in the order the executor carries it out."""

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
    #: The kind of what ``patched_job`` names: the workload's (its backend's), or a Job.
    patched_kind: str = "Job"
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
    #: plan needs all of it (``needs_whole_spec``: the executor reads it before it plans).
    fetch_spec: bool = False
    #: Why, for the log.
    notes: tuple[str, ...] = field(default=())

    @property
    def writes_nothing(self) -> bool:
        """Whether carrying this plan out makes no API request (most passes: the watch event of
        a write the last pass made, a Job's status the Job controller wrote): then no worker
        thread is needed, only the requeue. A field above that makes a request belongs here."""
        return (
            self.reject is None
            and self.validate is None
            and self.create is None
            and self.job_patch is None
            and self.workload_active is None
            and self.status_patch is None
            and not self.delete
            and not self.delete_job
            and not self.fetch_spec
        )


def status_changes(current: Obj, desired: Obj) -> dict[str, Any] | None:
    """The fields of ``desired`` that differ from ``current`` (only fields the operator owns)."""
    changed = {
        key: value
        for key, value in desired.items()
        if key in OWNED_STATUS_KEYS and current.get(key) != value
    }
    return changed or None


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


def plan(
    ftj: Obj,
    jobs: Sequence[Obj],
    pods: Sequence[Obj],
    settings: OperatorSettings,
    now: datetime,
    *,
    jobsets: Sequence[Obj] = (),
) -> Plan:
    """``decide`` on what the caches hold for ``ftj``: ``jobs`` the Jobs named for it (owned or
    not, its JobSet's too), ``pods`` the Pods that name it, ``jobsets`` the JobSets."""
    return decide(observe(ftj, jobs, pods, jobsets), settings, now)


def needs_whole_spec(seen: Observed) -> bool:
    """Whether the plan for ``seen`` validates the spec or makes children from it while the
    FineTuneJob holds only part of its spec: then the executor reads the whole one first."""
    if not seen.partial or seen.ftj.get("metadata", {}).get("deletionTimestamp"):
        return False
    if seen.workload is not None or seen.status.get("phase") in FINISHED:
        return False
    return seen.validation is None or validation_succeeded(seen.validation)


def decide(seen: Observed, settings: OperatorSettings, now: datetime) -> Plan:
    """What to do for the FineTuneJob ``seen`` shows; its status is the latest the operator
    knows (its own writes included)."""
    ftj = seen.ftj
    if ftj.get("metadata", {}).get("deletionTimestamp"):
        return Plan(notes=("being deleted",))
    if seen.backend is not None and seen.workload is not None and seen.view is not None:
        return _run_plan(seen, seen.backend, seen.workload, seen.view, now)
    if seen.status.get("phase") in FINISHED:
        # A finished run is never started again, whatever happened to its workload.
        return _finished_plan(ftj, None, now)
    return _start_plan(seen, settings, now)


def _start_plan(seen: Observed, settings: OperatorSettings, now: datetime) -> Plan:
    """No trainer Job yet: the Validating phase's status while it runs (or failed), else the
    spec checked and the next Job to create."""
    ftj = seen.ftj
    validation = seen.validation
    if validation is not None and not validation_succeeded(validation):
        # The Validating phase runs (or failed): its status needs no more of the spec.
        return _validating_plan(seen, validation, now)
    if needs_whole_spec(seen):
        return Plan(fetch_spec=True, notes=("the whole spec is needed",))
    checked = validate(ftj.get("spec") or {}, settings)
    if isinstance(checked, Rejection):
        return Plan(reject=checked)
    job_name = child_names(str(ftj["metadata"]["name"]), checked.resources.nodes).job
    if any(j.get("metadata", {}).get("name") == job_name for j in seen.jobs):
        # A same-named Job that isn't ours: never take it over, never touch it.
        return _conflict(job_name)
    attempt = _next_attempt(seen.status)
    if not checked.validation.enabled:
        return Plan(create=checked, attempt=attempt)
    if validation is None:
        name = child_names(str(ftj["metadata"]["name"])).validation_job
        if any(j.get("metadata", {}).get("name") == name for j in seen.jobs):
            return _conflict(name)
        return Plan(validate=checked)
    # Validated: its estimate is written with the trainer Job's first status (_trainer_plan).
    return Plan(create=checked, attempt=attempt, notes=("validated",))


def _conflict(job_name: str) -> Plan:
    return Plan(
        reject=Rejection(Reason.NAME_CONFLICT, (f"Job {job_name} exists and is not owned",))
    )


def _run_plan(seen: Observed, backend: Backend, workload: Obj, view: Obj, now: datetime) -> Plan:
    """The workload runs (or ran): the status from it, its run-policy patch, a failed group
    attempt replaced where the backend doesn't restart groups itself."""
    ftj, status = seen.ftj, seen.status
    desired = derive_status(ftj, view, seen.pods, now)
    if status.get("phase") in FINISHED:
        # A finished run is never started again, whatever happened to its workload.
        return _finished_plan(ftj, status_changes(status, desired), now)
    validation = seen.validation
    if "estimate" not in status and validation is not None and validation_succeeded(validation):
        # The Validating phase's estimate goes with the trainer's first status write.
        estimate = validation_estimate(validation, seen.validation_pods)
        if estimate:
            desired["estimate"] = estimate
    changes = status_changes(status, desired)
    restart = (
        not backend.restarts_groups
        and nodes_of(ftj) > 1
        and not workload.get("metadata", {}).get("deletionTimestamp")
        and group_restart_due(ftj, view, seen.pods)
    )
    if restart:
        return Plan(
            status_patch=changes,
            delete_job=True,
            notes=("group attempt failed: replacing its Job",),
        )
    follow = Plan(
        job_patch=backend.run_policy_patch(ftj, workload),
        patched_job=str(workload.get("metadata", {}).get("name")),
        patched_kind=backend.kind,
        workload_active=kueue.desired_workload_active(ftj, workload),
    )
    if backend.between_attempts(workload, seen.jobs):
        # The status says Retrying already, and says more once the next Job's pods are there.
        return replace(follow, requeue_after=1.0)
    return _written_or_held(follow, status, desired, changes, job=view, pods=seen.pods, now=now)


def _written_or_held(
    follow: Plan,
    status: Obj,
    desired: Obj,
    changes: dict[str, Any] | None,
    *,
    job: Obj,
    pods: Sequence[Obj],
    now: datetime,
) -> Plan:
    """``follow`` with the status changes, or with a requeue when they are a step on the way
    (the pod is starting, the Job's Complete is due): then they are written with the next
    phase, in one patch, unless it takes long; the next event of the pod or Job queues this job
    again at once."""
    hold = _hold(status, desired, changes, job=job, pods=pods, now=now)
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


def _validating_plan(seen: Observed, validation: Obj, now: datetime) -> Plan:
    """While the Validating phase's Job runs (or once it failed): the status from it, and its
    suspend following the run policy."""
    ftj, status = seen.ftj, seen.status
    desired = derive_status(ftj, validation, seen.validation_pods, now, validating=True)
    changes = status_changes(status, desired)
    follow = Plan(
        # Its deadline is the operator's (KUBETUNE_VALIDATION_ACTIVE_DEADLINE_SECONDS), set at
        # create; only suspend follows the run policy.
        job_patch=kueue.run_policy_patch(ftj, validation, deadline=False),
        patched_job=str(validation.get("metadata", {}).get("name")),
    )
    return _written_or_held(
        follow, status, desired, changes, job=validation, pods=seen.validation_pods, now=now
    )


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
