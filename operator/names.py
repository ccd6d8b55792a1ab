"""The names and labels of a FineTuneJob's children, and which of them it owns. Pure.

Stable names (a replayed create finds the same objects), shortened with a hash to what each
kind admits; the labels every child and pod carries; the ownerReference to the FineTuneJob.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubetune.api.contract import (
    COMPONENT_LABEL,
    FINETUNEJOB_ANNOTATION,
    JOB_LABEL,
    JOB_UID_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    RENDEZVOUS_PORT,
)
from kubetune.api.models import API_VERSION, KIND, FineTuneJobSpec
from kubetune.api.uris import parse_uri
from kubetune.operator import jobset as js
from kubetune.operator.objects import Manifest, Obj

_LABEL_MAX: Final = 63
#: A child's metadata by its name (and labels of its own): ``child_metadata``.
ChildMetadata = Callable[..., Manifest]


@dataclass(frozen=True)
class ChildNames:
    """Names of a FineTuneJob's children; stable, so a replayed create finds the same objects."""

    job: str
    config_map: str
    network_policy: str
    #: The headless Service of a multi-pod group (pod subdomain): ``<job>-<index>.<service>``.
    service: str
    #: The Validating phase's CPU Job (kubetune-trainer preflight).
    validation_job: str = ""
    #: A group's JobSet (``KUBETUNE_GROUP_WORKLOAD=jobset``), also its pods' subdomain (the
    #: JobSet controller's headless Service): ``<jobset>-node-0-<index>.<jobset>``.
    jobset: str = ""


def short_name(name: str, limit: int = _LABEL_MAX) -> str:
    """``name`` if it fits ``limit``, else a prefix and a hash (still a valid DNS label)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def child_names(name: str, nodes: int = 1) -> ChildNames:
    # The Job's name becomes a pod label value (batch.kubernetes.io/job-name): at most 63 chars.
    # A group's pods are named by host ``<job>-<index>``, also a DNS label: room for the index.
    job = short_name(name) if nodes <= 1 else short_name(name, _LABEL_MAX - len(f"-{nodes - 1}"))
    # A Service's name must start with a letter (RFC 1035); a FineTuneJob's need not.
    service = job if job[:1].isalpha() else short_name(f"g-{job}")
    # JobSet's own limit (its webhook's, which the operator keeps without it): the longest pod
    # name, ``<jobset>-node-0-<index>-<5 random>``, is an RFC 1035 label; so is the JobSet's name,
    # the Service's. The pods' host names (``<jobset>-node-0-<index>``) are shorter still.
    room = _LABEL_MAX - len(f"-{js.REPLICATED_JOB}-0-{max(nodes - 1, 0)}-abcde")
    group = name if name[:1].isalpha() else f"g-{name}"
    jobset = short_name(group, room)
    return ChildNames(
        job=job,
        config_map=short_name(f"{name}-trainer-config", 253),
        network_policy=short_name(f"{name}-trainer", 253),
        service=service,
        validation_job=short_name(f"{name}-validate"),
        jobset=jobset,
    )


def rendezvous_endpoint(names: ChildNames, *, jobset: bool = False) -> str:
    """host:port of rank 0's pod: the Job controller names it ``<job>-0`` in the subdomain (under
    a JobSet, the Job is ``<jobset>-node-0`` and the subdomain the JobSet's name)."""
    if jobset:
        return f"{js.pod_host(names.jobset, 0)}.{names.jobset}:{RENDEZVOUS_PORT}"
    return f"{names.job}-0.{names.service}:{RENDEZVOUS_PORT}"


def labels_for(name: str, uid: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "kubetune",
        COMPONENT_LABEL: "trainer",
        "app.kubernetes.io/instance": short_name(name),
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_LABEL: short_name(name),
    }
    if uid:
        labels[JOB_UID_LABEL] = uid
    return labels


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by pvc:// URIs → whether the trainer writes to them (the output's claim)."""
    claims: dict[str, bool] = {}
    for _, uri, writable in spec.uris():
        claim = parse_uri(uri, ("pvc",), "a").claim if uri.startswith("pvc://") else None
        if claim is not None:
            claims[claim] = claims.get(claim, False) or writable
    return claims


def owner_reference(metadata: dict[str, Any]) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(name: str, namespace: str, uid: str | None) -> ChildMetadata:
    """The metadata of each child of the FineTuneJob ``namespace/name``: its labels, the
    annotation naming it, and (with its uid) the ownerReference to it."""
    labels = labels_for(name, uid)

    def meta(object_name: str, extra_labels: dict[str, str] | None = None) -> Manifest:
        result: Manifest = {
            "name": object_name,
            "namespace": namespace,
            "labels": {**labels, **(extra_labels or {})},
            "annotations": {FINETUNEJOB_ANNOTATION: name},
        }
        if uid:
            result["ownerReferences"] = [owner_reference({"name": name, "uid": uid})]
        return result

    return meta


def group_selector(name: str, uid: str | None = None) -> Manifest:
    """The labels every pod of one FineTuneJob carries, and no other pod kubetune makes: its uid
    (two jobs whose names shorten alike never share it); the shortened name only where no uid is
    known yet (a render without one)."""
    if uid:
        return {JOB_UID_LABEL: uid, MANAGED_BY_LABEL: MANAGED_BY}
    return {JOB_LABEL: short_name(name), MANAGED_BY_LABEL: MANAGED_BY}


def owned_by(obj: Obj, uid: str) -> bool:
    """Whether ``uid`` is the controller owner of ``obj``: the only objects kubetune touches."""
    owners = obj.get("metadata", {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


def _owned_job(ftj: Obj, jobs: Sequence[Obj], *, validation: bool) -> Obj | None:
    uid = str(ftj.get("metadata", {}).get("uid"))
    name = child_names(str(ftj.get("metadata", {}).get("name"))).validation_job
    return next(
        (
            job
            for job in jobs
            if owned_by(job, uid) and (job.get("metadata", {}).get("name") == name) == validation
        ),
        None,
    )


def owned_job(ftj: Obj, jobs: Sequence[Obj]) -> Obj | None:
    """The trainer Job (not the Validating phase's)."""
    return _owned_job(ftj, jobs, validation=False)


def owned_validation_job(ftj: Obj, jobs: Sequence[Obj]) -> Obj | None:
    """The Validating phase's Job."""
    return _owned_job(ftj, jobs, validation=True)


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
