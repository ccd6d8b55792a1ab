"""The batch/v1 Job that runs ``kubetune-trainer``, and its pod. Pure: data in, manifests out."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.api.contract import (
    ADAPTER_REGISTRY_AUTH_ENV,
    ADAPTER_REGISTRY_AUTH_MOUNT_PATH,
    ATTEMPT_ANNOTATION,
    AWS_ACCESS_KEY_ID_ENV,
    AWS_ENDPOINT_URL_ENV,
    AWS_REGION_ENV,
    AWS_SECRET_ACCESS_KEY_ENV,
    AWS_SESSION_TOKEN_ENV,
    CONFIG_FILE,
    CONTROLLER_UID_LABEL,
    DOWNLOAD_ALLOWED_CIDRS_ENV,
    FINETUNEJOB_ANNOTATION,
    KUEUE_QUEUE_LABEL,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    NON_RETRIABLE_EXIT_CODES,
    PROGRESS_TOKEN_DIR,
    PROGRESS_TOKEN_FILE,
    PROGRESS_TOKEN_VOLUME,
    PUSH_TOKEN_ENV,
    PVC_ROOT_ENV,
    REGISTRY_AUTH_ENV,
    REGISTRY_AUTH_KEY,
    REGISTRY_AUTH_MOUNT_PATH,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    TERMINATION_MESSAGE_PATH,
    TOKEN_ENV,
    TRAINER_CONTAINER,
)
from kubetune.api.models import FineTuneJobSpec
from kubetune.operator.names import (
    ChildNames,
    labels_for,
    pvc_claims,
    rendezvous_endpoint,
    short_name,
)
from kubetune.operator.objects import Manifest
from kubetune.operator.pod_template import apply_pod_template
from kubetune.operator.settings import OperatorSettings

#: The trainer's HOME, an emptyDir: the trainer image's home and working folder.
TRAINER_HOME = "/home/kubetune"


def render_job(
    spec: FineTuneJobSpec,
    name: str,
    names: ChildNames,
    meta: Any,
    settings: OperatorSettings,
    *,
    attempt: int = 1,
    jobset: bool = False,
    uid: str | None = None,
) -> Manifest:
    queue = spec.scheduling.queue_name
    # A job created suspended is handed to Kueue (labelled) only when resumed: Kueue would
    # admit and unsuspend it at once (the operator then labels it, desired_job_patch).
    job_labels = {KUEUE_QUEUE_LABEL: queue} if queue and not spec.run_policy.suspend else {}
    nodes = spec.resources.nodes
    pod_spec = _pod_spec(spec, names, settings)
    if nodes > 1:
        # The Job controller names each pod's host <job>-<index>; in the Service's subdomain
        # that is a DNS name. The rendezvous id is the Job's uid: one Job per group attempt, so
        # a restarted group never meets a stale rendezvous (JobSet, too, makes its Job again
        # for each restart).
        pod_spec["subdomain"] = names.jobset if jobset else names.service
        (container,) = pod_spec["containers"]
        container["env"] += [
            {"name": RENDEZVOUS_ENDPOINT_ENV, "value": rendezvous_endpoint(names, jobset=jobset)},
            {
                "name": RENDEZVOUS_ID_ENV,
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.labels['{CONTROLLER_UID_LABEL}']"}
                },
            },
        ]
    pod_labels = dict(labels_for(name, uid))
    pod_annotations = {FINETUNEJOB_ANNOTATION: name}
    if spec.pod_template is not None:
        pod_spec, pod_labels, pod_annotations = apply_pod_template(
            pod_spec, pod_labels, pod_annotations, spec.pod_template
        )
    rules = _failure_rules(nodes)
    job_spec: Manifest = {
        # Kueue admits a queued Job by unsuspending it; without a queue, suspend follows the spec.
        "suspend": spec.run_policy.suspend or bool(queue),
        # A group's ranks live and die together: the first pod lost fails this Job (the Job
        # controller stops the other ranks, which checkpoint on SIGTERM), and the operator
        # starts the next attempt as a new Job, up to runPolicy.backoffLimit attempts more.
        "backoffLimit": spec.run_policy.backoff_limit if nodes == 1 else 0,
        "completions": nodes,
        "parallelism": nodes,
        "podFailurePolicy": {"rules": rules},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    job_meta = meta(names.job, job_labels)
    if nodes > 1:
        job_meta["annotations"][ATTEMPT_ANNOTATION] = str(attempt)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_meta,
        "spec": job_spec,
    }


def _failure_rules(nodes: int) -> list[Manifest]:
    """The Job's podFailurePolicy: a non-retriable exit fails it; one pod's disruption doesn't
    count (a group can't replace one rank in place)."""
    rules: list[Manifest] = [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": TRAINER_CONTAINER,
                "operator": "In",
                "values": sorted(int(code) for code in NON_RETRIABLE_EXIT_CODES),
            },
        },
    ]
    if nodes == 1:
        # Preemption, eviction and node drains don't count against backoffLimit: the next pod
        # resumes from the latest checkpoint. (A group can't replace one rank in place: see
        # render_job.)
        rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
    return rules


def _pod_spec(spec: FineTuneJobSpec, names: ChildNames, settings: OperatorSettings) -> Manifest:
    resources = spec.resources
    amounts: dict[str, str] = {}
    if resources.cpu is not None:
        amounts["cpu"] = resources.cpu
    if resources.memory is not None:
        amounts["memory"] = resources.memory
    if resources.gpus > 0:
        amounts[resources.gpu_resource_name] = str(resources.gpus)

    env = _env(spec, settings)
    mounts, volumes = _volumes(spec, names, settings, env)
    container_security, pod_security = _security(settings)
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
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": False,
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


def _env(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[Manifest]:
    """The trainer's variables: the claims' root, the download policy, and every credential by
    Secret reference (the values never pass through the operator)."""
    env: list[Manifest] = [
        {"name": PVC_ROOT_ENV, "value": settings.pvc_root},
        {
            "name": DOWNLOAD_ALLOWED_CIDRS_ENV,
            "value": ",".join(settings.trainer_download_allowed_cidrs),
        },
    ]
    # The model's token reads; a push token writes (the trainer falls back to the read token).
    # Both by reference: the values never pass through the operator.
    token_refs = [(TOKEN_ENV, spec.model.token_secret_ref)]
    if spec.output.push_to_hub is not None:
        token_refs.append((PUSH_TOKEN_ENV, spec.output.push_to_hub.token_secret_ref))
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is not None:
        # MLflow's own variables, so its client authenticates without the trainer handling them.
        token_refs += [
            (MLFLOW_USERNAME_ENV, mlflow.username_secret_ref),
            (MLFLOW_PASSWORD_ENV, mlflow.password_secret_ref),
            (MLFLOW_TOKEN_ENV, mlflow.token_secret_ref),
        ]
    store = spec.object_store
    if store is not None:
        # The object store's keys, read by the AWS SDKs the trainer's s3:// client uses.
        token_refs += [
            (AWS_ACCESS_KEY_ID_ENV, store.access_key_id_secret_ref),
            (AWS_SECRET_ACCESS_KEY_ENV, store.secret_access_key_secret_ref),
            (AWS_SESSION_TOKEN_ENV, store.session_token_secret_ref),
        ]
        for variable, value in ((AWS_ENDPOINT_URL_ENV, store.endpoint),
                                (AWS_REGION_ENV, store.region)):  # fmt: skip
            if value is not None:
                env.append({"name": variable, "value": value})
    for variable, ref in token_refs:
        if ref is not None:
            env.append(
                {
                    "name": variable,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
    return env


def _volumes(
    spec: FineTuneJobSpec, names: ChildNames, settings: OperatorSettings, env: list[Manifest]
) -> tuple[list[Manifest], list[Manifest]]:
    """The trainer's mounts and volumes: its config, /dev/shm, registry logins (their paths
    added to ``env``), the claims, and the progress token."""
    resources = spec.resources
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": settings.config_mount_path, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        # The root filesystem is read-only: what a run writes outside its output goes to these
        # (temporary files, compile caches under /tmp; the hub's and Triton's caches under HOME).
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": TRAINER_HOME},
    ]
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]
    env.append({"name": "HOME", "value": TRAINER_HOME})
    # The registry logins as files (docker configs), read by the trainer alone: the output's,
    # and the starting adapter's.
    logins = [
        ("registry-auth", spec.output.registry, REGISTRY_AUTH_MOUNT_PATH, REGISTRY_AUTH_ENV),
        ("adapter-registry-auth", spec.model.adapter.registry if spec.model.adapter else None,
         ADAPTER_REGISTRY_AUTH_MOUNT_PATH, ADAPTER_REGISTRY_AUTH_ENV),
    ]  # fmt: skip
    for volume_name, registry, mount_path, variable in logins:
        if registry is None or registry.credentials_secret_ref is None:
            continue
        mounts.append({"name": volume_name, "mountPath": mount_path, "readOnly": True})
        volumes.append(
            {
                "name": volume_name,
                "secret": {
                    "secretName": registry.credentials_secret_ref.name,
                    "items": [{"key": REGISTRY_AUTH_KEY, "path": REGISTRY_AUTH_KEY}],
                },
            }
        )
        env.append({"name": variable, "value": f"{mount_path}/{REGISTRY_AUTH_KEY}"})
    for claim, writable in pvc_claims(spec).items():
        volume = short_name(f"pvc-{claim}")
        mounts.append(
            {"name": volume, "mountPath": f"{settings.pvc_root}/{claim}", "readOnly": not writable}
        )
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim}})

    if settings.progress_url:
        # The pod's only credential: a token for the operator's progress endpoint, of an
        # audience the apiserver refuses, bound to this pod (it dies with it), renewed by the
        # kubelet. No API token is mounted.
        mounts.append(
            {"name": PROGRESS_TOKEN_VOLUME, "mountPath": PROGRESS_TOKEN_DIR, "readOnly": True}
        )
        volumes.append(
            {
                "name": PROGRESS_TOKEN_VOLUME,
                "projected": {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": settings.progress_audience,
                                "expirationSeconds": settings.progress_token_expiration_seconds,
                                "path": PROGRESS_TOKEN_FILE,
                            }
                        }
                    ]
                },
            }
        )
    return mounts, volumes


def _security(settings: OperatorSettings) -> tuple[Manifest, Manifest]:
    """The container's and the pod's security contexts."""
    container_security: Manifest = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
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

    return container_security, pod_security
