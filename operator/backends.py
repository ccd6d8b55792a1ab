"""The workload backends that run a FineTuneJob's trainer pods, behind one interface: a batch/v1
Job (one pod, or an Indexed Job of a multi-pod group beside its headless Service, restarted by the
operator one attempt at a time) and JobSet's JobSet (a group that JobSet restarts itself;
``KUBETUNE_GROUP_WORKLOAD=jobset``). Each says how its workload is rendered, which object of the
caches is it, how its status reads (the one Job of an attempt that ``status.derive_status``
knows), how it follows the run policy and whether it is between attempts; the planner and the
executor ask the backend and never branch on which it is. Kueue's part is ``kueue``. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kubetune.api.models import FineTuneJobSpec
from kubetune.operator import jobset as js
from kubetune.operator.companions import headless_service
from kubetune.operator.kueue import queue_of, run_policy_patch
from kubetune.operator.names import ChildNames, owned_job, owned_jobset
from kubetune.operator.objects import Manifest, Obj


@dataclass(frozen=True)
class Parts:
    """What a workload is rendered from: the FineTuneJob's name and uid, its children's names,
    the metadata every child gets (``meta(name)``), and the trainer's rendered Job."""

    name: str
    uid: str | None
    names: ChildNames
    meta: Any
    job: Manifest


class Backend(Protocol):
    """How a FineTuneJob's trainer pods run."""

    #: The workload's kind and apiVersion (what the executor patches).
    kind: str
    api_version: str
    #: It restarts a failed group attempt itself: the operator replaces no Job.
    restarts_groups: bool

    def render(self, spec: FineTuneJobSpec, parts: Parts) -> list[Manifest]:
        """The workload's objects, in creation order, from the trainer's rendered ``job``."""
        ...

    def owned(self, ftj: Obj, jobs: Sequence[Obj], jobsets: Sequence[Obj]) -> Obj | None:
        """The workload ``ftj`` owns among what the caches hold, if any."""
        ...

    def view(self, workload: Obj, jobs: Sequence[Obj]) -> Obj:
        """The workload as the one Job of a group attempt, whose pods and conditions the
        status reads."""
        ...

    def run_policy_patch(self, ftj: Obj, workload: Obj) -> dict[str, Any] | None:
        """What of the workload must follow ``ftj``'s runPolicy (and its queue)."""
        ...

    def between_attempts(self, workload: Obj, jobs: Sequence[Obj]) -> bool:
        """The backend is replacing a failed attempt's Job: the status waits for the next."""
        ...


class Jobs:
    """A batch/v1 Job: one pod, or a multi-pod group's Indexed Job (one per attempt, made again
    by the operator) beside the group's headless Service."""

    kind: str = "Job"
    api_version: str = "batch/v1"
    restarts_groups: bool = False

    def render(self, spec: FineTuneJobSpec, parts: Parts) -> list[Manifest]:
        if spec.resources.nodes > 1:
            return [headless_service(parts.name, parts.names, parts.meta, parts.uid), parts.job]
        return [parts.job]

    def owned(self, ftj: Obj, jobs: Sequence[Obj], jobsets: Sequence[Obj]) -> Obj | None:
        return owned_job(ftj, jobs)

    def view(self, workload: Obj, jobs: Sequence[Obj]) -> Obj:
        return workload

    def run_policy_patch(self, ftj: Obj, workload: Obj) -> dict[str, Any] | None:
        return run_policy_patch(ftj, workload, queue=queue_of(ftj))

    def between_attempts(self, workload: Obj, jobs: Sequence[Obj]) -> bool:
        return False


class JobSets:
    """A multi-pod group's JobSet (``jobset.py``): JobSet makes the headless Service and
    restarts the group; its Job's deadline is in its template, so only suspend follows."""

    kind: str = js.KIND
    api_version: str = js.API_VERSION
    restarts_groups: bool = True

    def render(self, spec: FineTuneJobSpec, parts: Parts) -> list[Manifest]:
        return [js.render_jobset(spec, parts.name, parts.names, parts.meta, parts.job)]

    def owned(self, ftj: Obj, jobs: Sequence[Obj], jobsets: Sequence[Obj]) -> Obj | None:
        return owned_jobset(ftj, jobsets)

    def view(self, workload: Obj, jobs: Sequence[Obj]) -> Obj:
        return js.group_view(workload, jobs)

    def run_policy_patch(self, ftj: Obj, workload: Obj) -> dict[str, Any] | None:
        return run_policy_patch(ftj, workload, queue=queue_of(ftj), deadline=False)

    def between_attempts(self, workload: Obj, jobs: Sequence[Obj]) -> bool:
        # Between the failed attempt's Job (gone) and the next one (not made yet).
        return js.restarting(workload, jobs) and js.current_job(workload, jobs) is None


JOBS: Final[Backend] = Jobs()
JOBSETS: Final[Backend] = JobSets()
#: Looked for in this order: a FineTuneJob owns one workload, a JobSet or else a Job.
BACKENDS: Final[tuple[Backend, ...]] = (JOBSETS, JOBS)


def backend_for(nodes: int, *, jobset: bool) -> Backend:
    """The backend a new workload of ``nodes`` pods gets: a group's JobSet where JobSet runs
    groups (``jobset``: the settings ask for it and its CRD is installed), else a Job."""
    return JOBSETS if nodes > 1 and jobset else JOBS


def owned_workload(
    ftj: Obj, jobs: Sequence[Obj], jobsets: Sequence[Obj]
) -> tuple[Backend, Obj] | None:
    """The workload ``ftj`` owns, and its backend (None: none yet)."""
    for backend in BACKENDS:
        workload = backend.owned(ftj, jobs, jobsets)
        if workload is not None:
            return backend, workload
    return None
