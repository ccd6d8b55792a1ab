"""FineTuneJob → the child objects that run it. Pure: data in, manifests out.

``render`` returns, in the order they must be created: the ConfigMap with the resolved trainer
config, the NetworkPolicy, a group's headless Service, and the batch/v1 Job that runs
``kubetune-trainer`` (for a multi-pod group run by JobSet, the JobSet whose Job template that
Job is). No ServiceAccount, Role or RoleBinding: the pod runs as the namespace's trainer
ServiceAccount with no API token mounted, and reports progress to the operator with a
projected token of kubetune's own audience.
"""

from __future__ import annotations

from typing import Any, Final

from kubetune.api.config import JobRef, ProgressSettings, TrainerConfig
from kubetune.api.contract import (
    COMPONENT_LABEL,
    CONFIG_FILE,
    KUEUE_QUEUE_LABEL,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    NODE_RANK_ENV,
    PREFLIGHT_SUBCOMMAND,
    PROGRESS_TOKEN_DIR,
    PROGRESS_TOKEN_FILE,
    PROGRESS_TOKEN_VOLUME,
    PUSH_TOKEN_ENV,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    TRAINER_CONTAINER,
    VALIDATOR_COMPONENT,
)
from kubetune.api.models import FineTuneJobSpec
from kubetune.operator.backends import JOBSETS, Parts, backend_for
from kubetune.operator.companions import group_policy, trainers_policy
from kubetune.operator.names import child_metadata, child_names
from kubetune.operator.objects import Manifest
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.trainer_job import render_job


def trainer_config(
    spec: FineTuneJobSpec, name: str, namespace: str, uid: str | None, settings: OperatorSettings
) -> TrainerConfig:
    return TrainerConfig(
        job=JobRef(name=name, namespace=namespace, uid=uid),
        spec=spec,
        progress=progress_settings(settings),
    )


def progress_settings(settings: OperatorSettings) -> ProgressSettings:
    """Where the trainer reports: the operator's progress endpoint, with the pod's projected
    token and the operator's CA (nowhere when the operator serves no such endpoint)."""
    if not settings.progress_url:
        return ProgressSettings(interval_seconds=settings.progress_interval_seconds)
    return ProgressSettings(
        interval_seconds=settings.progress_interval_seconds,
        reporter="operator",
        url=settings.progress_url,
        ca_bundle=settings.progress_ca_bundle,
        token_file=f"{PROGRESS_TOKEN_DIR}/{PROGRESS_TOKEN_FILE}",
    )


def render(
    spec: FineTuneJobSpec,
    metadata: dict[str, Any],
    settings: OperatorSettings,
    attempt: int = 1,
    *,
    jobset: bool = False,
) -> list[Manifest]:
    """The children of the FineTuneJob with this ``spec`` and ``metadata`` (name, namespace, uid).

    Every child carries an ownerReference to the FineTuneJob when ``metadata`` has a uid, so
    deleting the FineTuneJob removes them (background propagation by the garbage collector).
    With ``resources.nodes`` > 1 the Job is Indexed, one pod per node, beside a headless Service
    that names the pods; ``attempt`` is the group attempt that Job runs (one Job per attempt).
    With ``jobset`` (JobSet's CRD is there and the settings ask for it) such a group is a JobSet
    instead, which makes the Service and restarts the group itself; one pod is a Job either way.
    """
    name = str(metadata["name"])
    namespace = str(metadata["namespace"])
    uid = metadata.get("uid")
    names = child_names(name, spec.resources.nodes)
    meta = child_metadata(name, namespace, uid)

    config = trainer_config(spec, name, namespace, uid, settings)
    config_map: Manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(names.config_map),
        "data": {CONFIG_FILE: config.to_yaml()},
    }
    group = spec.resources.nodes > 1
    backend = backend_for(spec.resources.nodes, jobset=jobset)
    by_jobset = backend is JOBSETS
    job = render_job(spec, name, names, meta, settings, attempt=attempt, jobset=by_jobset, uid=uid)
    children = [config_map]
    if settings.trainer_network_policy:
        children.append(trainers_policy(namespace, settings))
        if group:
            children.append(group_policy(name, names, meta, uid))
    return [
        *children,
        *backend.render(spec, Parts(name=name, uid=uid, names=names, meta=meta, job=job)),
    ]


def render_validation(
    spec: FineTuneJobSpec,
    metadata: dict[str, Any],
    settings: OperatorSettings,
    *,
    jobset: bool = False,
) -> list[Manifest]:
    """The children of the Validating phase: the same companions as ``render`` (config, network
    policy, a group's Service), then the validation Job instead of the trainer Job (or JobSet)."""
    *companions, workload = render(spec, metadata, settings, jobset=jobset)
    # One render, unless a group's workload is a JobSet: its Job is rendered on its own then.
    job = workload if workload["kind"] == "Job" else render(spec, metadata, settings)[-1]
    names = child_names(str(metadata["name"]))
    return [*companions, validation_job(job, spec, names.validation_job, settings)]


_DISTRIBUTED_ENV: Final = frozenset({RENDEZVOUS_ENDPOINT_ENV, RENDEZVOUS_ID_ENV, NODE_RANK_ENV})

#: Credentials the preflight never uses: it reads the model (``HF_TOKEN``) and the data, and
#: neither pushes nor tracks.
_UNUSED_BY_PREFLIGHT: Final = frozenset(
    {PUSH_TOKEN_ENV, MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV}
)


def validation_job(
    job: Manifest, spec: FineTuneJobSpec, name: str, settings: OperatorSettings
) -> Manifest:
    """The trainer Job made into the Validating phase's: one pod, ``kubetune-trainer
    preflight`` on the same config, image, security context, scheduling and pod template, with
    no GPU, no API token (the preflight reports through its termination message), no hub push or
    tracking credentials (registry logins stay: the preflight checks that the output's may push
    and pulls a starting adapter), every claim read-only, and the operator's CPU, memory,
    ephemeral-storage and deadline (``KUBETUNE_VALIDATION_*``), whatever the spec asks of the
    trainer. Not queued (it asks for no GPU quota); suspended with the run."""
    # Each object changed below is a copy (the rest is shared with ``job``, and never changed):
    # a deep copy of the whole Job cost as much as rendering it.
    manifest: Manifest = dict(job)
    metadata = manifest["metadata"] = dict(job["metadata"])
    metadata["name"] = name
    metadata["labels"] = _relabelled(metadata["labels"])
    job_spec = manifest["spec"] = dict(job["spec"])
    for key in ("completionMode", "successPolicy", "backoffLimitPerIndex", "maxFailedIndexes"):
        job_spec.pop(key, None)
    job_spec.update(
        suspend=spec.run_policy.suspend,
        completions=1,
        parallelism=1,
        activeDeadlineSeconds=settings.validation_active_deadline_seconds,
    )
    template = job_spec["template"] = dict(job_spec["template"])
    template["metadata"] = {
        **template["metadata"],
        "labels": _relabelled(template["metadata"]["labels"]),
    }
    pod = template["spec"] = dict(template["spec"])
    pod.pop("subdomain", None)
    pod["automountServiceAccountToken"] = False
    # The preflight reports through its termination message: no progress token either.
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != PROGRESS_TOKEN_VOLUME]
    requests = {
        "cpu": settings.validation_cpu_request,
        "memory": settings.validation_memory_request,
        "ephemeral-storage": settings.validation_ephemeral_storage_request,
    }
    limits = {
        "cpu": settings.validation_cpu_limit,
        "memory": settings.validation_memory_limit,
        "ephemeral-storage": settings.validation_ephemeral_storage_limit,
    }
    pod["containers"] = [dict(c) for c in pod["containers"]]
    for container in pod["containers"]:
        container["resources"] = {"requests": dict(requests), "limits": dict(limits)}
        container["volumeMounts"] = [
            {**m, "readOnly": True} if m["name"].startswith("pvc-") else m
            for m in container.get("volumeMounts") or []
            if m["name"] != PROGRESS_TOKEN_VOLUME
        ]
        container["env"] = [
            e
            for e in container.get("env") or []
            if e["name"] not in _DISTRIBUTED_ENV | _UNUSED_BY_PREFLIGHT
        ]
        if container["name"] == TRAINER_CONTAINER:
            command = container["command"]
            container["command"] = [command[0], PREFLIGHT_SUBCOMMAND, *command[1:]]
        container.pop("ports", None)
    return manifest


def _relabelled(labels: dict[str, str]) -> dict[str, str]:
    """The trainer's labels as the validation Job's: the validator's component, not queued."""
    copied = {k: v for k, v in labels.items() if k != KUEUE_QUEUE_LABEL}
    copied[COMPONENT_LABEL] = VALIDATOR_COMPONENT
    return copied
