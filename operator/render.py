"""FineTuneJob → the child objects that run it. Pure: data in, manifests out.

``render`` returns, in the order they must be created: the ConfigMap with the resolved trainer
config, the per-job ServiceAccount, Role and RoleBinding (the trainer may patch only its own
FineTuneJob's status), and the batch/v1 Job that runs ``kubetune-trainer``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Final

from kubetune.api.config import JobRef, ProgressSettings, TrainerConfig
from kubetune.api.contract import (
    CONFIG_FILE,
    FINETUNEJOB_ANNOTATION,
    JOB_LABEL,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NODE_RANK_ENV,
    NON_RETRIABLE_EXIT_CODES,
    PREFLIGHT_SUBCOMMAND,
    PUSH_TOKEN_ENV,
    PVC_ROOT_ENV,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    TERMINATION_MESSAGE_PATH,
    TOKEN_ENV,
    TRAINER_CONTAINER,
)
from kubetune.api.models import API_VERSION, GROUP, KIND, PLURAL, FineTuneJobSpec
from kubetune.api.uris import parse_uri
from kubetune.operator.policy import apply_pod_template
from kubetune.operator.settings import OperatorSettings

Manifest = dict[str, Any]

_LABEL_MAX: Final = 63


@dataclass(frozen=True)
class ChildNames:
    """Names of a FineTuneJob's children; stable, so a replayed create finds the same objects."""

    job: str
    config_map: str
    service_account: str
    role: str
    role_binding: str
    network_policy: str
    #: The Validating phase's CPU Job (kubetune-trainer preflight).
    validation_job: str = ""


def short_name(name: str, limit: int = _LABEL_MAX) -> str:
    """``name`` if it fits ``limit``, else a prefix and a hash (still a valid DNS label)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def child_names(name: str) -> ChildNames:
    # The Job's name becomes a pod label value (batch.kubernetes.io/job-name): at most 63 chars.
    job = short_name(name)
    sa = short_name(f"{name}-trainer", 253)
    return ChildNames(
        job=job,
        config_map=short_name(f"{name}-trainer-config", 253),
        service_account=sa,
        role=sa,
        role_binding=sa,
        network_policy=sa,
        validation_job=short_name(f"{name}-validate"),
    )


def labels_for(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/instance": short_name(name),
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_LABEL: short_name(name),
    }


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by pvc:// URIs → whether the trainer writes to them (the output's claim)."""
    claims: dict[str, bool] = {}
    for uri, writable in (
        (spec.model.uri, False),
        (spec.dataset.uri, False),
        (spec.output.uri, True),
    ):
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


def trainer_config(
    spec: FineTuneJobSpec, name: str, namespace: str, uid: str | None, settings: OperatorSettings
) -> TrainerConfig:
    return TrainerConfig(
        job=JobRef(name=name, namespace=namespace, uid=uid),
        spec=spec,
        progress=ProgressSettings(
            interval_seconds=settings.progress_interval_seconds, reporter="kubernetes"
        ),
    )


def render(
    spec: FineTuneJobSpec, metadata: dict[str, Any], settings: OperatorSettings
) -> list[Manifest]:
    """The children of the FineTuneJob with this ``spec`` and ``metadata`` (name, namespace, uid).

    Every child carries an ownerReference to the FineTuneJob when ``metadata`` has a uid, so
    deleting the FineTuneJob removes them (background propagation by the garbage collector).
    """
    name = str(metadata["name"])
    namespace = str(metadata["namespace"])
    uid = metadata.get("uid")
    names = child_names(name)
    labels = labels_for(name)
    annotations = {FINETUNEJOB_ANNOTATION: name}

    def meta(object_name: str, extra_labels: dict[str, str] | None = None) -> Manifest:
        result: Manifest = {
            "name": object_name,
            "namespace": namespace,
            "labels": {**labels, **(extra_labels or {})},
            "annotations": dict(annotations),
        }
        if uid:
            result["ownerReferences"] = [owner_reference(metadata)]
        return result

    config = trainer_config(spec, name, namespace, uid, settings)
    config_map: Manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(names.config_map),
        "data": {CONFIG_FILE: config.to_yaml()},
    }
    service_account: Manifest = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(names.service_account),
    }
    role: Manifest = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(names.role),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        ],
    }
    role_binding: Manifest = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(names.role_binding),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.role,
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": names.service_account, "namespace": namespace}
        ],
    }
    job = render_job(spec, name, names, meta, settings)
    children = [config_map, service_account, role, role_binding]
    if settings.trainer_network_policy:
        children.append(network_policy(name, names, meta, settings))
    return [*children, job]


#: The validation pod's component label (the trainer's pods say ``trainer``).
VALIDATOR_COMPONENT: Final = "validator"
_DISTRIBUTED_ENV: Final = frozenset({RENDEZVOUS_ENDPOINT_ENV, RENDEZVOUS_ID_ENV, NODE_RANK_ENV})


def render_validation(
    spec: FineTuneJobSpec, metadata: dict[str, Any], settings: OperatorSettings
) -> list[Manifest]:
    """The children of the Validating phase: the same companions as ``render`` (config, identity,
    network policy), then the validation Job instead of the trainer Job."""
    *companions, job = render(spec, metadata, settings)
    names = child_names(str(metadata["name"]))
    return [*companions, validation_job(job, spec, names.validation_job)]


def validation_job(job: Manifest, spec: FineTuneJobSpec, name: str) -> Manifest:
    """The trainer Job made into the Validating phase's: one pod, ``kubetune-trainer
    preflight`` on the same config, image, security context, scheduling and pod template, with
    no GPU, no API token (the preflight reports through its termination message) and every
    claim read-only. Not queued (it asks for no GPU quota); suspended with the run."""
    manifest = copy.deepcopy(job)
    metadata = manifest["metadata"]
    metadata["name"] = name
    metadata["labels"].pop(KUEUE_QUEUE_LABEL, None)
    metadata["labels"]["app.kubernetes.io/component"] = VALIDATOR_COMPONENT
    job_spec = manifest["spec"]
    for key in ("completionMode", "successPolicy", "backoffLimitPerIndex", "maxFailedIndexes"):
        job_spec.pop(key, None)
    job_spec.update(suspend=spec.run_policy.suspend, completions=1, parallelism=1)
    template = job_spec["template"]
    template["metadata"]["labels"]["app.kubernetes.io/component"] = VALIDATOR_COMPONENT
    template["metadata"]["labels"].pop(KUEUE_QUEUE_LABEL, None)
    pod = template["spec"]
    pod.pop("subdomain", None)
    pod["automountServiceAccountToken"] = False
    gpu = spec.resources.gpu_resource_name
    for container in pod["containers"]:
        for amounts in (container.get("resources") or {}).values():
            amounts.pop(gpu, None)
        for mount in container.get("volumeMounts") or []:
            if mount["name"].startswith("pvc-"):
                mount["readOnly"] = True
        container["env"] = [
            e for e in container.get("env") or [] if e["name"] not in _DISTRIBUTED_ENV
        ]
        if container["name"] == TRAINER_CONTAINER:
            command = container["command"]
            container["command"] = [command[0], PREFLIGHT_SUBCOMMAND, *command[1:]]
        container.pop("ports", None)
    return manifest


def network_policy(name: str, names: ChildNames, meta: Any, settings: OperatorSettings) -> Manifest:
    """No ingress; egress to DNS and the allowed CIDRs, less the excepted (metadata) addresses."""
    egress: list[Manifest] = [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    ]
    blocks = []
    for cidr in settings.trainer_egress_cidrs:
        family = ":" in cidr
        excepted = [e for e in settings.trainer_egress_except if (":" in e) == family]
        blocks.append({"ipBlock": {"cidr": cidr, **({"except": excepted} if excepted else {})}})
    if blocks:
        egress.append({"to": blocks})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(names.network_policy),
        "spec": {
            "podSelector": {
                "matchLabels": {JOB_LABEL: short_name(name), MANAGED_BY_LABEL: MANAGED_BY}
            },
            "policyTypes": ["Ingress", "Egress"],
            "egress": egress,
        },
    }


def render_job(
    spec: FineTuneJobSpec,
    name: str,
    names: ChildNames,
    meta: Any,
    settings: OperatorSettings,
) -> Manifest:
    queue = spec.scheduling.queue_name
    job_labels = {KUEUE_QUEUE_LABEL: queue} if queue else {}
    pod_spec = _pod_spec(spec, names, settings)
    pod_labels = dict(labels_for(name))
    pod_annotations = {FINETUNEJOB_ANNOTATION: name}
    if spec.pod_template is not None:
        pod_spec, pod_labels, pod_annotations = apply_pod_template(
            pod_spec, pod_labels, pod_annotations, spec.pod_template
        )
    job_spec: Manifest = {
        # Kueue admits a queued Job by unsuspending it; without a queue, suspend follows the spec.
        "suspend": spec.run_policy.suspend or bool(queue),
        "backoffLimit": spec.run_policy.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": sorted(int(code) for code in NON_RETRIABLE_EXIT_CODES),
                    },
                },
                # Preemption, eviction and node drains don't count against backoffLimit: the
                # next pod resumes from the latest checkpoint.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta(names.job, job_labels),
        "spec": job_spec,
    }


def _pod_spec(spec: FineTuneJobSpec, names: ChildNames, settings: OperatorSettings) -> Manifest:
    resources = spec.resources
    amounts: dict[str, str] = {}
    if resources.cpu is not None:
        amounts["cpu"] = resources.cpu
    if resources.memory is not None:
        amounts["memory"] = resources.memory
    if resources.gpus > 0:
        amounts[resources.gpu_resource_name] = str(resources.gpus)

    env: list[Manifest] = [{"name": PVC_ROOT_ENV, "value": settings.pvc_root}]
    # The model's token reads; a push token writes (the trainer falls back to the read token).
    # Both by reference: the values never pass through the operator.
    token_refs = [(TOKEN_ENV, spec.model.token_secret_ref)]
    if spec.output.push_to_hub is not None:
        token_refs.append((PUSH_TOKEN_ENV, spec.output.push_to_hub.token_secret_ref))
    for variable, ref in token_refs:
        if ref is not None:
            env.append(
                {
                    "name": variable,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": settings.config_mount_path, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
    ]
    for claim, writable in pvc_claims(spec).items():
        volume = short_name(f"pvc-{claim}")
        mounts.append(
            {"name": volume, "mountPath": f"{settings.pvc_root}/{claim}", "readOnly": not writable}
        )
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim}})

    container_security: Manifest = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": settings.run_as_non_root,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod_security: Manifest = {
        "runAsNonRoot": settings.run_as_non_root,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if settings.run_as_user is not None:
        pod_security["runAsUser"] = settings.run_as_user
        pod_security["runAsGroup"] = settings.run_as_user
    if settings.fs_group is not None:
        pod_security["fsGroup"] = settings.fs_group

    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        # Explicit, not the image's entrypoint: the local cluster's node runs commands.
        "command": [
            settings.trainer_command,
            "--config",
            f"{settings.config_mount_path}/{CONFIG_FILE}",
        ],
        "env": env,
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": mounts,
        "securityContext": container_security,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: Manifest = {
        "restartPolicy": "Never",
        "serviceAccountName": names.service_account,
        "automountServiceAccountToken": True,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": volumes,
    }
    scheduling = spec.scheduling
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations
        ]
    if scheduling.affinity:
        pod["affinity"] = copy.deepcopy(scheduling.affinity)
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    return pod
