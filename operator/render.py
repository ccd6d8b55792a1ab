"""FineTuneJob → the child objects that run it. Pure: data in, manifests out.

``render`` returns, in the order they must be created: the ConfigMap with the resolved trainer
config, the NetworkPolicy, a group's headless Service, and the batch/v1 Job that runs
``kubetune-trainer`` (for a multi-pod group run by JobSet, the JobSet whose Job template that
Job is). No ServiceAccount, Role or RoleBinding: the pod runs as the namespace's trainer
ServiceAccount with no API token mounted, and reports progress to the operator with a
projected token of kubetune's own audience.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any, Final

from kubetune.api.config import JobRef, ProgressSettings, TrainerConfig
from kubetune.api.contract import (
    ADAPTER_REGISTRY_AUTH_ENV,
    ADAPTER_REGISTRY_AUTH_MOUNT_PATH,
    ATTEMPT_ANNOTATION,
    AWS_ACCESS_KEY_ID_ENV,
    AWS_ENDPOINT_URL_ENV,
    AWS_REGION_ENV,
    AWS_SECRET_ACCESS_KEY_ENV,
    AWS_SESSION_TOKEN_ENV,
    COMPONENT_LABEL,
    CONFIG_FILE,
    CONTROLLER_UID_LABEL,
    DOWNLOAD_ALLOWED_CIDRS_ENV,
    FINETUNEJOB_ANNOTATION,
    JOB_LABEL,
    JOB_UID_LABEL,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    NODE_RANK_ENV,
    NON_RETRIABLE_EXIT_CODES,
    PREFLIGHT_SUBCOMMAND,
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
    RENDEZVOUS_PORT,
    TERMINATION_MESSAGE_PATH,
    TOKEN_ENV,
    TRAINER_CONTAINER,
    VALIDATOR_COMPONENT,
)
from kubetune.api.models import API_VERSION, KIND, FineTuneJobSpec
from kubetune.api.uris import parse_uri
from kubetune.operator import jobset as js
from kubetune.operator.policy import apply_pod_template
from kubetune.operator.settings import OperatorSettings

Manifest = dict[str, Any]

_LABEL_MAX: Final = 63


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
    labels = labels_for(name, uid)
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
    group = spec.resources.nodes > 1
    by_jobset = group and jobset
    job = render_job(spec, name, names, meta, settings, attempt=attempt, jobset=by_jobset, uid=uid)
    children = [config_map]
    if settings.trainer_network_policy:
        children.append(network_policy(name, names, meta, settings, group=group, uid=uid))
    if by_jobset:
        return [*children, render_jobset(spec, name, names, meta, job)]
    if group:
        children.append(headless_service(name, names, meta, uid))
    return [*children, job]


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
        "apiVersion": js.API_VERSION,
        "kind": js.KIND,
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
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [js.REPLICATED_JOB]},
            "startupPolicy": {"startupPolicyOrder": "AnyOrder"},
            "failurePolicy": {
                "maxRestarts": spec.run_policy.backoff_limit,
                "restartStrategy": "Recreate",
                "rules": [
                    {
                        "name": "non-retriable",
                        "action": "FailJobSet",
                        "onJobFailureReasons": list(js.FINAL_JOB_FAILURES),
                        "targetReplicatedJobs": [js.REPLICATED_JOB],
                    }
                ],
            },
            "replicatedJobs": [
                {
                    "name": js.REPLICATED_JOB,
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


def group_selector(name: str, uid: str | None = None) -> Manifest:
    """The labels every pod of one FineTuneJob carries, and no other pod kubetune makes: its uid
    (two jobs whose names shorten alike never share it); the shortened name only where no uid is
    known yet (a render without one)."""
    if uid:
        return {JOB_UID_LABEL: uid, MANAGED_BY_LABEL: MANAGED_BY}
    return {JOB_LABEL: short_name(name), MANAGED_BY_LABEL: MANAGED_BY}


def headless_service(name: str, names: ChildNames, meta: Any, uid: str | None = None) -> Manifest:
    """The Service whose name is the group's pods' subdomain: ``<job>-<index>.<service>``
    resolves to that pod, ready or not (ranks must find rank 0 before any of them is Ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(names.service),
        "spec": {
            "clusterIP": "None",
            "selector": group_selector(name, uid),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


_DISTRIBUTED_ENV: Final = frozenset({RENDEZVOUS_ENDPOINT_ENV, RENDEZVOUS_ID_ENV, NODE_RANK_ENV})


def render_validation(
    spec: FineTuneJobSpec,
    metadata: dict[str, Any],
    settings: OperatorSettings,
    *,
    jobset: bool = False,
) -> list[Manifest]:
    """The children of the Validating phase: the same companions as ``render`` (config, network
    policy, a group's Service), then the validation Job instead of the trainer Job (or JobSet)."""
    *companions, _ = render(spec, metadata, settings, jobset=jobset)
    job = render(spec, metadata, settings)[-1]
    names = child_names(str(metadata["name"]))
    return [*companions, validation_job(job, spec, names.validation_job, settings)]


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
    manifest = copy.deepcopy(job)
    metadata = manifest["metadata"]
    metadata["name"] = name
    metadata["labels"].pop(KUEUE_QUEUE_LABEL, None)
    metadata["labels"][COMPONENT_LABEL] = VALIDATOR_COMPONENT
    job_spec = manifest["spec"]
    for key in ("completionMode", "successPolicy", "backoffLimitPerIndex", "maxFailedIndexes"):
        job_spec.pop(key, None)
    job_spec.update(
        suspend=spec.run_policy.suspend,
        completions=1,
        parallelism=1,
        activeDeadlineSeconds=settings.validation_active_deadline_seconds,
    )
    template = job_spec["template"]
    template["metadata"]["labels"][COMPONENT_LABEL] = VALIDATOR_COMPONENT
    template["metadata"]["labels"].pop(KUEUE_QUEUE_LABEL, None)
    pod = template["spec"]
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
    for container in pod["containers"]:
        container["resources"] = {"requests": dict(requests), "limits": dict(limits)}
        container["volumeMounts"] = [
            m for m in container.get("volumeMounts") or [] if m["name"] != PROGRESS_TOKEN_VOLUME
        ]
        for mount in container.get("volumeMounts") or []:
            if mount["name"].startswith("pvc-"):
                mount["readOnly"] = True
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


def network_policy(
    name: str,
    names: ChildNames,
    meta: Any,
    settings: OperatorSettings,
    *,
    group: bool = False,
    uid: str | None = None,
) -> Manifest:
    """No ingress; egress to the cluster's DNS and the allowed CIDRs, less what lies inside them
    of the excepted addresses (private ranges, the cluster's pod and service CIDRs, metadata).

    DNS goes only to the cluster's DNS pods (and the DNS CIDRs the settings add), never port 53
    anywhere: an open port 53 is a way out to any host. A group's pods also reach each other,
    and only each other: the rendezvous (rank 0's port) and the collectives, whose gloo and NCCL
    sockets take ephemeral ports on each side, so the rule between them names the pods, not
    ports.
    """
    dns_ports = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    dns_peers: list[Manifest] = [
        {
            "namespaceSelector": {"matchLabels": dict(settings.trainer_dns_namespace_selector)},
            "podSelector": {"matchLabels": dict(settings.trainer_dns_pod_selector)},
        }
    ]
    dns_peers += [{"ipBlock": block} for block in egress_blocks(settings.trainer_dns_cidrs, [])]
    egress: list[Manifest] = [{"to": dns_peers, "ports": dns_ports}]
    peers: list[Manifest] = [{"podSelector": {"matchLabels": group_selector(name, uid)}}]
    if group:
        egress.append({"to": peers})
    if settings.progress_url and settings.progress_peer_pod_selector and settings.progress_port:
        # Progress goes to the operator's pods, on the progress port and nothing else.
        operator: Manifest = {
            "podSelector": {"matchLabels": dict(settings.progress_peer_pod_selector)}
        }
        if settings.progress_peer_namespace_selector:
            operator["namespaceSelector"] = {
                "matchLabels": dict(settings.progress_peer_namespace_selector)
            }
        egress.append(
            {"to": [operator], "ports": [{"port": settings.progress_port, "protocol": "TCP"}]}
        )
    if settings.trainer_apiserver_cidrs:
        # Progress goes to the API server, whose endpoints often lie in an excepted range.
        api_peers = egress_blocks(settings.trainer_apiserver_cidrs, [])
        api_ports = [{"port": port, "protocol": "TCP"} for port in settings.trainer_apiserver_ports]
        egress.append({"to": [{"ipBlock": block} for block in api_peers], "ports": api_ports})
    excepted = [*settings.trainer_egress_except, *settings.trainer_cluster_cidrs]
    blocks = egress_blocks(settings.trainer_egress_cidrs, excepted)
    if blocks:
        egress.append({"to": [{"ipBlock": block} for block in blocks]})
    policy: Manifest = {
        "podSelector": {"matchLabels": group_selector(name, uid)},
        "policyTypes": ["Ingress", "Egress"],
        "egress": egress,
    }
    if group:
        policy["ingress"] = [{"from": peers}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(names.network_policy),
        "spec": policy,
    }


def egress_blocks(cidrs: list[str], excepted: list[str]) -> list[Manifest]:
    """An ipBlock per CIDR, with the excepted networks that lie strictly inside it.

    The apiserver refuses an ``except`` that isn't a strict subset of its ``cidr``, and one such
    entry would fail every job: an excepted range that holds the whole CIDR (a platform that
    allows its pods' CIDR while the private ranges are excepted) leaves the CIDR as it is, the
    platform's explicit choice; one of the other address family or outside it is left out.
    """
    blocks: list[Manifest] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr)
        inside: list[str] = []
        for entry in excepted:
            other = ipaddress.ip_network(entry)
            if _strictly_inside(other, network) and str(other) not in inside:
                inside.append(str(other))
        block: Manifest = {"cidr": str(network)}
        if inside:
            block["except"] = inside
        blocks.append(block)
    return blocks


def _strictly_inside(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.prefixlen > outer.prefixlen and inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.prefixlen > outer.prefixlen and inner.subnet_of(outer)
    return False


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
        # below.)
        rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
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


def _pod_spec(spec: FineTuneJobSpec, names: ChildNames, settings: OperatorSettings) -> Manifest:
    resources = spec.resources
    amounts: dict[str, str] = {}
    if resources.cpu is not None:
        amounts["cpu"] = resources.cpu
    if resources.memory is not None:
        amounts["memory"] = resources.memory
    if resources.gpus > 0:
        amounts[resources.gpu_resource_name] = str(resources.gpus)

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
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": settings.config_mount_path, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
    ]
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
