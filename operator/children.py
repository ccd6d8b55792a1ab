"""What a FineTuneJob owns, as the watch caches hold it: its trainer Job, the Validating phase's
Job, a group's JobSet and each one's Pods, observed once per reconcile. Pure: data in, data out.

Only objects whose controller owner is the FineTuneJob (by uid) count: a same-named object of
someone else is never read as the job's, nor touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from kubetune.operator import jobset as js
from kubetune.operator.names import child_names

Obj = Mapping[str, Any]

#: Marks a FineTuneJob whose spec holds only what the watch cache keeps
#: (``controller.FINETUNEJOB_SPEC_KEPT``): the planner asks for the whole one before it
#: validates the spec or makes children from it.
PARTIAL_SPEC: Final = "kubetune.io/partial-spec"


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


@dataclass(frozen=True)
class Observed:
    """One FineTuneJob and what it owns, sorted out once per reconcile."""

    ftj: Obj
    #: The Jobs named for it (owned or not: a same-named foreign Job is a conflict).
    jobs: tuple[Obj, ...]
    #: The trainer Job, the Validating phase's Job, the group's JobSet (each only if owned).
    job: Obj | None
    validation: Obj | None
    jobset: Obj | None
    #: The trainer Job's pods (or, under a JobSet, its current Job's), and the validation pods.
    pods: tuple[Obj, ...]
    validation_pods: tuple[Obj, ...]
    #: A group run by its JobSet: the JobSet and its current Job read as one Job.
    view: Obj | None = None

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
    jobset = owned_jobset(ftj, jobsets)
    validation = owned_validation_job(ftj, jobs)
    if jobset is not None:
        view = js.group_view(jobset, jobs)
        job: Obj | None = None
        own_pods = pods_of(view, pods)
    else:
        view = None
        job = owned_job(ftj, jobs)
        own_pods = pods_of(job, pods)
    return Observed(
        ftj=ftj,
        jobs=tuple(jobs),
        job=job,
        validation=validation,
        jobset=jobset,
        pods=tuple(own_pods),
        validation_pods=tuple(pods_of(validation, pods)),
        view=view,
    )
