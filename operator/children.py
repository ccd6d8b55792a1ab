"""What a FineTuneJob owns, as the watch caches hold it: its workload (a Job or a group's JobSet,
through its backend), the Validating phase's Job and each one's Pods, observed once per
reconcile. Pure: data in, data out.

Only objects whose controller owner is the FineTuneJob (by uid) count (``names.owned_by``): a
same-named object of someone else is never read as the job's, nor touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from kubetune.operator.backends import Backend, owned_workload
from kubetune.operator.names import owned_validation_job, pods_of
from kubetune.operator.objects import Obj

#: Marks a FineTuneJob whose spec holds only what the watch cache keeps
#: (``controller.FINETUNEJOB_SPEC_KEPT``): the planner asks for the whole one before it
#: validates the spec or makes children from it.
PARTIAL_SPEC: Final = "kubetune.io/partial-spec"


@dataclass(frozen=True)
class Observed:
    """One FineTuneJob and what it owns, sorted out once per reconcile."""

    ftj: Obj
    #: The Jobs named for it (owned or not: a same-named foreign Job is a conflict).
    jobs: tuple[Obj, ...]
    #: The workload that runs its trainer pods (a Job, or a group's JobSet) and its backend.
    workload: Obj | None
    backend: Backend | None
    #: The workload read as the one Job of an attempt (``Backend.view``), and that Job's pods.
    view: Obj | None
    pods: tuple[Obj, ...]
    #: The Validating phase's Job, and its pods.
    validation: Obj | None
    validation_pods: tuple[Obj, ...]

    @property
    def status(self) -> Obj:
        return self.ftj.get("status") or {}

    @property
    def partial(self) -> bool:
        """The FineTuneJob holds only the part of its spec the cache keeps."""
        return bool(self.ftj.get(PARTIAL_SPEC))

    def with_ftj(self, ftj: Obj) -> Observed:
        """The same children, seen from ``ftj`` (the whole FineTuneJob read from the API)."""
        return replace(self, ftj=ftj)


def observe(
    ftj: Obj, jobs: Sequence[Obj], pods: Sequence[Obj], jobsets: Sequence[Obj] = ()
) -> Observed:
    """Sort ``jobs``, ``pods`` and ``jobsets`` (what the caches hold for ``ftj``) into what it
    owns."""
    found = owned_workload(ftj, jobs, jobsets)
    backend, workload = found if found is not None else (None, None)
    view = backend.view(workload, jobs) if backend is not None and workload is not None else None
    validation = owned_validation_job(ftj, jobs)
    return Observed(
        ftj=ftj,
        jobs=tuple(jobs),
        workload=workload,
        backend=backend,
        view=view,
        pods=tuple(pods_of(view, pods)),
        validation=validation,
        validation_pods=tuple(pods_of(validation, pods)),
    )
