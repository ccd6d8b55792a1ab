"""Operator configuration from the environment (prefix ``KUBETUNE_``)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final, Literal

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune.api.contract import (
    ADAPTER_REGISTRY_AUTH_ENV,
    CONFIG_MOUNT_PATH,
    DEFAULT_PVC_ROOT,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    NODE_RANK_ENV,
    PROGRESS_AUDIENCE,
    PUSH_TOKEN_ENV,
    PVC_ROOT_ENV,
    REGISTRY_AUTH_ENV,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    TERMINATION_LOG_ENV,
    TOKEN_ENV,
    TRAINER_COMMAND,
)
from kubetune.api.models import Quantity


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _empty_is_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


CsvList = Annotated[list[str], NoDecode, BeforeValidator(_split_csv)]

#: Pod-spec fields of spec.podTemplate no setting can allow: each would let a job's creator run
#: as another identity, reach the node, or run a command of their own beside the trainer.
NEVER_POD_FIELDS: Final = frozenset(
    {"hostNetwork", "hostPID", "hostIPC", "hostUsers", "nodeName", "serviceAccountName",
     "serviceAccount", "automountServiceAccountToken", "securityContext", "initContainers",
     "ephemeralContainers", "restartPolicy", "shareProcessNamespace", "os", "overhead",
     "hostname", "subdomain", "setHostnameAsFQDN"}
)  # fmt: skip
#: Fields of the trainer container no setting can allow (kubetune sets them, or they run
#: commands of their own: probes and lifecycle hooks exec in the container).
NEVER_CONTAINER_FIELDS: Final = frozenset(
    {"image", "imagePullPolicy", "command", "args", "securityContext", "lifecycle",
     "livenessProbe", "readinessProbe", "startupProbe", "volumeDevices", "workingDir",
     "terminationMessagePath", "terminationMessagePolicy", "resizePolicy", "restartPolicy",
     "envFrom"}
)  # fmt: skip
#: Environment variables of the trainer container that name where tokens go: allowed only with a
#: value the platform team lists (KUBETUNE_ALLOWED_HUB_ENDPOINTS, _OBJECT_STORE_ENDPOINTS).
ENDPOINT_ENV: Final = {
    "HF_ENDPOINT": "allowed_hub_endpoints",
    "AWS_ENDPOINT_URL": "allowed_object_store_endpoints",
    "AWS_ENDPOINT_URL_S3": "allowed_object_store_endpoints",
}
#: Environment variables no setting can allow in spec.podTemplate (compared without case): they
#: send the pod's tokens elsewhere (proxies, endpoints), let its TLS be intercepted (CA bundles),
#: run the tenant's code in the trainer (PYTHONPATH, LD_PRELOAD, plugins), or are kubetune's own
#: contract (tokens, mounts, rendezvous).
NEVER_ENV: Final = frozenset(
    {"HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
     "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
     "PYTHONUSERBASE", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "LD_PRELOAD", "LD_LIBRARY_PATH",
     "LD_AUDIT", "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "HF_HOME", "HF_HUB_CACHE",
     "TRANSFORMERS_CACHE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
     "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
     "DOCKER_CONFIG", REGISTRY_AUTH_ENV, ADAPTER_REGISTRY_AUTH_ENV,
     TOKEN_ENV, PUSH_TOKEN_ENV, MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV,
     PVC_ROOT_ENV, RENDEZVOUS_ENDPOINT_ENV, RENDEZVOUS_ID_ENV, NODE_RANK_ENV,
     TERMINATION_LOG_ENV, *ENDPOINT_ENV}
)  # fmt: skip
#: Blocked within the egress CIDRs unless a platform says otherwise: addresses that are not the
#: internet (private, shared, loopback, link-local, unique-local) and every cloud metadata address
#: (most lie inside those ranges; they are listed for a platform that narrows the ranges).
DEFAULT_EGRESS_EXCEPT: Final = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # shared address space (RFC 6598), pods on some clouds
    "127.0.0.0/8", "169.254.0.0/16",  # loopback, link-local
    "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack metadata
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "192.0.0.192/32",  # Oracle Cloud metadata
    "::1/128", "fe80::/10", "fc00::/7",  # IPv6 loopback, link-local, unique-local
    "fd00:ec2::254/128",  # AWS metadata (IPv6)
    "fd20:ce::254/128",  # GCP metadata (IPv6)
)  # fmt: skip
OptionalInt = Annotated[int | None, BeforeValidator(_empty_is_none)]
OptionalStr = Annotated[str | None, BeforeValidator(_empty_is_none)]


class OperatorSettings(BaseSettings):
    """Everything a deployment may tune; every field maps to ``KUBETUNE_<FIELD_NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", frozen=True, extra="ignore")

    namespaces: CsvList = Field(
        default_factory=list,
        description="Namespaces to watch, comma-separated; empty watches the whole cluster.",
    )
    max_workers: int = Field(
        default=20, ge=1, description="Handlers that may run at once (kopf's max_workers)."
    )
    trainer_image: str = Field(
        default="kubetune/trainer:0.1.0",
        description="Trainer image for jobs that set no spec.image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy of the trainer container."
    )
    denied_options: CsvList = Field(
        default_factory=lambda: ["trustRemoteCode"],
        description=(
            "Spec options this cluster refuses, comma-separated: trustRemoteCode, pushToHub, merge."
        ),
    )
    allowed_images: CsvList = Field(
        default_factory=list,
        description=(
            "Patterns (shell-style, e.g. registry.example.com/ml/trainer:*) a job's spec.image "
            "may match; empty refuses spec.image."
        ),
    )
    allowed_pod_template_fields: CsvList = Field(
        default_factory=list,
        description=(
            "spec.podTemplate fields a job may set, comma-separated: pod-spec fields "
            "(tolerations, runtimeClassName, volumes, ...), trainer-container fields as "
            "containers.<field> (containers.env, containers.volumeMounts, ...), and "
            "metadata.labels / metadata.annotations; empty refuses spec.podTemplate."
        ),
    )
    allowed_pod_template_env: CsvList = Field(
        default_factory=lambda: [
            "TOKENIZERS_PARALLELISM",
            "OMP_NUM_THREADS",
            "NCCL_DEBUG",
            "PYTORCH_CUDA_ALLOC_CONF",
        ],
        description=(
            "Names of environment variables spec.podTemplate may give the trainer container "
            "(with containers.env allowed), comma-separated; plain values only (no valueFrom "
            "but fieldRef/resourceFieldRef). Proxies, CA bundles, PYTHONPATH, LD_PRELOAD, "
            "kubetune's own variables and the like can never be listed; HF_ENDPOINT and "
            "AWS_ENDPOINT_URL(_S3) are allowed with a value the endpoint settings list."
        ),
    )
    allowed_tracking_hosts: CsvList = Field(
        default_factory=list,
        description=(
            "Hosts (host or host:port, shell-style patterns) spec.tracking.mlflow.trackingUri "
            "may name, comma-separated; empty allows any host."
        ),
    )
    tracking_http_credentials_hosts: CsvList = Field(
        default_factory=list,
        description=(
            "Hosts (host or host:port, shell-style patterns) to which MLflow credentials may go "
            "over plain http; elsewhere a tracking URI with credentials must be https. Empty: "
            "https only."
        ),
    )
    allowed_hub_endpoints: CsvList = Field(
        default_factory=list,
        description=(
            "Hub endpoints (https://host[:port]) a job may set as HF_ENDPOINT through "
            "spec.podTemplate; empty: the default hub only."
        ),
    )
    allowed_object_store_endpoints: CsvList = Field(
        default_factory=list,
        description=(
            "Object-store endpoints (https://host[:port]) a job may name in "
            "spec.objectStore.endpoint, or set as AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 "
            "through spec.podTemplate; empty: the store's default only."
        ),
    )
    allowed_registries: CsvList = Field(
        default_factory=list,
        description=(
            "OCI registries (host or host:port, shell-style patterns) an oci:// spec.output.uri "
            "may name, comma-separated; empty refuses oci:// outputs."
        ),
    )
    plain_http_registries: CsvList = Field(
        default_factory=list,
        description=(
            "Registries (host or host:port, shell-style patterns) a job may reach over plain "
            "http (spec.output.registry.plainHttp), such as the local cluster's; empty: https "
            "only."
        ),
    )
    trainer_network_policy: bool = Field(
        default=True,
        description=(
            "Give each trainer pod a NetworkPolicy: no ingress, egress to the cluster's DNS and "
            "the CIDRs."
        ),
    )
    trainer_egress_cidrs: CsvList = Field(
        default_factory=lambda: ["0.0.0.0/0", "::/0"],
        description="Where trainer pods may connect (besides DNS), comma-separated CIDRs.",
    )
    trainer_egress_except: CsvList = Field(
        default_factory=lambda: list(DEFAULT_EGRESS_EXCEPT),
        description=(
            "Addresses blocked within those CIDRs (default: private, shared, loopback and "
            "link-local ranges and every known cloud metadata address); only those inside a "
            "CIDR are applied to it."
        ),
    )
    trainer_cluster_cidrs: CsvList = Field(
        default_factory=list,
        description=(
            "The cluster's pod and service CIDRs, blocked within the egress CIDRs like "
            "trainer_egress_except (name them where they lie outside the private ranges)."
        ),
    )
    trainer_dns_namespace_selector: dict[str, str] = Field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "kube-system"},
        description="Labels of the namespace of the cluster's DNS pods (JSON object).",
    )
    trainer_dns_pod_selector: dict[str, str] = Field(
        default_factory=lambda: {"k8s-app": "kube-dns"},
        description="Labels of the cluster's DNS pods (JSON object; CoreDNS keeps kube-dns's).",
    )
    trainer_dns_cidrs: CsvList = Field(
        default_factory=list,
        description=(
            "More DNS servers trainer pods may ask on port 53, as CIDRs (a node-local DNS "
            "cache's address, such as 169.254.20.10/32)."
        ),
    )
    trainer_apiserver_cidrs: CsvList = Field(
        default_factory=list,
        description=(
            "The API server's endpoint addresses (kubectl get endpoints kubernetes), as CIDRs "
            "trainer pods may reach on trainer_apiserver_ports to report progress where they "
            "lie inside an excepted range; empty: no such rule."
        ),
    )
    trainer_apiserver_ports: Annotated[list[int], NoDecode, BeforeValidator(_split_csv)] = Field(
        default_factory=lambda: [443, 6443],
        description="The API server's ports, for trainer_apiserver_cidrs (comma-separated).",
    )
    trainer_download_allowed_cidrs: CsvList = Field(
        default_factory=list,
        description=(
            "Private, loopback or link-local addresses the trainer may download datasets from "
            "(comma-separated CIDRs); every other non-public address is refused."
        ),
    )
    trainer_command: str = Field(
        default=TRAINER_COMMAND,
        min_length=1,
        description="The trainer's executable in the trainer image (given --config FILE).",
    )
    group_workload: Literal["job", "jobset"] = Field(
        default="job",
        description=(
            "What runs a multi-pod group (resources.nodes > 1): job, an Indexed Job beside a "
            "headless Service with the operator restarting the group; jobset, a JobSet "
            "(jobset.x-k8s.io/v1alpha2) that restarts it, where its CRD is installed (else the "
            "Indexed Job, with a warning)."
        ),
    )
    validation_cpu_request: Quantity = Field(
        default="100m", description="CPU request of the Validating phase's pod."
    )
    validation_cpu_limit: Quantity = Field(
        default="2", description="CPU limit of the Validating phase's pod."
    )
    validation_memory_request: Quantity = Field(
        default="256Mi", description="Memory request of the Validating phase's pod."
    )
    validation_memory_limit: Quantity = Field(
        default="4Gi",
        description="Memory limit of the Validating phase's pod (tokenizer, tokenized sample).",
    )
    validation_ephemeral_storage_request: Quantity = Field(
        default="512Mi", description="Ephemeral-storage request of the Validating phase's pod."
    )
    validation_ephemeral_storage_limit: Quantity = Field(
        default="10Gi",
        description=(
            "Ephemeral-storage limit of the Validating phase's pod (downloaded tokenizer and "
            "dataset, logs); past it the kubelet evicts the pod."
        ),
    )
    validation_active_deadline_seconds: int = Field(
        default=1800,
        ge=1,
        description="The Validating phase fails after this many seconds (its Job's deadline).",
    )
    progress_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Least seconds between a trainer's progress reports, and between the operator's "
            "writes of one job's status.progress."
        ),
    )
    progress_port: OptionalInt = Field(
        default=8443,
        ge=1,
        le=65535,
        description=(
            "Port of the progress endpoint (HTTPS, POST /v1/progress) trainers report to; "
            "empty: none (trainers then report nothing)."
        ),
    )
    progress_reuse_port: bool = Field(
        default=False,
        description=(
            "Bind the progress port with SO_REUSEPORT, so replicas on one host share it as a "
            "Service shares them (the local cluster's tests; a pod has its own port)."
        ),
    )
    progress_url: OptionalStr = Field(
        default=None,
        description=(
            "The progress endpoint's URL as trainer pods reach it (the chart's Service: "
            "https://<release>-progress.<namespace>.svc:8443/v1/progress); empty: trainers "
            "report no progress."
        ),
    )
    progress_tls_cert_file: OptionalStr = Field(
        default=None,
        description="The progress endpoint's serving certificate (PEM); empty: plain HTTP.",
    )
    progress_tls_key_file: OptionalStr = Field(
        default=None, description="The serving certificate's private key (PEM)."
    )
    progress_ca_bundle: OptionalStr = Field(
        default=None,
        description=(
            "The CA certificate (PEM text) that signed the serving certificate: written into "
            "each trainer's config, the only one it trusts for the progress URL; empty: the "
            "trainer trusts its system's CAs."
        ),
    )
    progress_peer_namespace_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Labels of the operator's namespace, for the trainer NetworkPolicy's rule to the "
            "progress port (JSON object; with progress_peer_pod_selector; empty: no rule)."
        ),
    )
    progress_peer_pod_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of the operator's pods, for that rule (JSON object).",
    )
    progress_audience: str = Field(
        default=PROGRESS_AUDIENCE,
        min_length=1,
        description=(
            "Audience of the trainer's projected progress token (TokenReview checks it; the "
            "apiserver accepts no token of this audience)."
        ),
    )
    progress_token_expiration_seconds: int = Field(
        default=600,
        ge=600,
        description="Lifetime of the progress token (the kubelet renews it at 80%).",
    )
    progress_reviews_per_second: float = Field(
        default=20.0,
        gt=0,
        description=(
            "TokenReviews the progress endpoint may ask for per second, all callers together "
            "(a known token is answered from a cache): beyond it, 429."
        ),
    )
    trainer_service_account: str = Field(
        default="default",
        min_length=1,
        description=(
            "The ServiceAccount of trainer pods (one per namespace, never made per job; the "
            "namespace's default by default). Its token is not mounted: the pod gets only a "
            "progress token of progress_audience, which the apiserver refuses."
        ),
    )
    liveness_endpoint: OptionalStr = Field(
        default="http://0.0.0.0:8080/healthz",
        description="kopf's liveness probe endpoint; empty turns it off.",
    )
    json_logs: bool = Field(default=False, description="Log as JSON lines (kopf's JSON format).")
    verbose: bool = Field(default=False, description="Debug logging.")
    # The restricted Pod Security profile by default. The local cluster runs pod commands as the
    # host user and can't honour runAsNonRoot for processes that aren't images, so it turns these
    # down explicitly (KUBETUNE_RUN_AS_NON_ROOT=false).
    run_as_non_root: bool = Field(default=True, description="Set runAsNonRoot on the trainer pod.")
    run_as_user: OptionalInt = Field(
        default=1000, ge=0, description="runAsUser of the trainer pod; empty leaves it unset."
    )
    fs_group: OptionalInt = Field(
        default=1000, ge=0, description="fsGroup of the trainer pod; empty leaves it unset."
    )
    config_mount_path: str = Field(
        default=CONFIG_MOUNT_PATH, description="Where the trainer config ConfigMap is mounted."
    )
    pvc_root: str = Field(
        default=DEFAULT_PVC_ROOT, description="Where claims named by pvc:// URIs are mounted."
    )
    watch_timeout_seconds: int = Field(
        default=300, ge=10, description="Server-side timeout of each watch request."
    )
    watch_inactivity_seconds: float = Field(
        default=70.0,
        ge=1,
        description=(
            "A watch that brings no event, not even a bookmark (the apiserver sends one about "
            "every minute), for this long is taken for dead and started again."
        ),
    )
    list_chunk_size: int = Field(
        default=50,
        ge=1,
        description=(
            "Objects per page of the watches' first list (and after each watch restart): the "
            "most the operator parses at once."
        ),
    )
    api_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Timeout of each of the operator's own API requests (not the watches).",
    )
    status_recheck_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often unfinished jobs are re-derived even without events.",
    )
    reference_recheck_seconds: float = Field(
        default=15.0, gt=0, description="How soon missing PVCs are looked for again."
    )
    metrics_port: OptionalInt = Field(
        default=9090, ge=1, le=65535, description="Port of the Prometheus /metrics; empty: none."
    )
    metrics_auth: bool = Field(
        default=True,
        description=(
            "Serve /metrics only to bearer tokens of identities that may get the non-resource "
            "URL /metrics (TokenReview and SubjectAccessReview, as kube-rbac-proxy does); "
            "false serves anyone who reaches the port."
        ),
    )
    leader_election: bool = Field(
        default=True,
        description="Act only while holding the Lease (run two replicas, one acts at a time).",
    )
    lease_name: str = Field(default="kubetune-operator", min_length=1, description="The Lease.")
    lease_namespace: OptionalStr = Field(
        default=None,
        description="The Lease's namespace; empty: the operator pod's own (POD_NAMESPACE), "
        "else default.",
    )
    lease_duration_seconds: int = Field(
        default=10,
        ge=2,
        description="A Lease not renewed for this long is taken over (the takeover time).",
    )
    lease_renew_seconds: float = Field(
        default=2.0, gt=0, description="How often the holder renews (and others look)."
    )
    identity: OptionalStr = Field(
        default=None,
        description="This replica's name in the Lease; empty: the pod's name (POD_NAME) or host.",
    )

    @field_validator(
        "trainer_egress_cidrs", "trainer_egress_except", "trainer_cluster_cidrs",
        "trainer_dns_cidrs", "trainer_apiserver_cidrs", "trainer_download_allowed_cidrs",
    )  # fmt: skip
    @classmethod
    def _cidrs(cls, cidrs: list[str]) -> list[str]:
        wrong = []
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError:
                wrong.append(cidr)
        if wrong:
            raise ValueError(f"not CIDRs (address/prefix, host bits zero): {', '.join(wrong)}")
        return cidrs

    @field_validator("allowed_pod_template_fields")
    @classmethod
    def _never(cls, fields: list[str]) -> list[str]:
        never = [
            f
            for f in fields
            if f in NEVER_POD_FIELDS
            or (
                f.startswith("containers.")
                and f.removeprefix("containers.") in NEVER_CONTAINER_FIELDS
            )
        ]
        if never:
            raise ValueError(f"these pod fields can never be allowed: {', '.join(never)}")
        return fields

    @field_validator("allowed_pod_template_env")
    @classmethod
    def _never_env(cls, names: list[str]) -> list[str]:
        never = [n for n in names if n.upper() in NEVER_ENV]
        if never:
            raise ValueError(
                f"these environment variables can never be allowed: {', '.join(never)}"
            )
        return names
