"""What the platform lets a FineTuneJob ask for: the settings ``policy.py`` reads (options,
images, pod-template fields and variables, tracking hosts, hub and object-store endpoints,
registries), and what no setting can allow."""

from __future__ import annotations

from typing import Final

from pydantic import Field, field_validator

from kubetune.api.contract import (
    ADAPTER_REGISTRY_AUTH_ENV,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    NODE_RANK_ENV,
    PUSH_TOKEN_ENV,
    PVC_ROOT_ENV,
    REGISTRY_AUTH_ENV,
    RENDEZVOUS_ENDPOINT_ENV,
    RENDEZVOUS_ID_ENV,
    TERMINATION_LOG_ENV,
    TOKEN_ENV,
)
from kubetune.operator.settings_types import CsvList, SettingsGroup

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


class TenantSettings(SettingsGroup):
    """What a job's spec may ask of this cluster."""

    denied_options: CsvList = Field(default_factory=lambda: ["trustRemoteCode"])
    """Spec options this cluster refuses, comma-separated: trustRemoteCode, pushToHub, merge."""
    allowed_images: CsvList = Field(default_factory=list)
    """Patterns (shell-style, e.g. registry.example.com/ml/trainer:*) a job's spec.image may match;
    empty refuses spec.image."""
    allowed_pod_template_fields: CsvList = Field(default_factory=list)
    """spec.podTemplate fields a job may set, comma-separated: pod-spec fields (tolerations,
    runtimeClassName, volumes, ...), trainer-container fields as containers.<field> (containers.env,
    containers.volumeMounts, ...), and metadata.labels / metadata.annotations; empty refuses
    spec.podTemplate."""
    allowed_pod_template_env: CsvList = Field(
        default_factory=lambda: [
            "TOKENIZERS_PARALLELISM",
            "OMP_NUM_THREADS",
            "NCCL_DEBUG",
            "PYTORCH_CUDA_ALLOC_CONF",
        ]
    )
    """Names of environment variables spec.podTemplate may give the trainer container (with
    containers.env allowed), comma-separated; plain values only (no valueFrom but
    fieldRef/resourceFieldRef). Proxies, CA bundles, PYTHONPATH, LD_PRELOAD, kubetune's own
    variables and the like can never be listed; HF_ENDPOINT and AWS_ENDPOINT_URL(_S3) are allowed
    with a value the endpoint settings list."""
    allowed_tracking_hosts: CsvList = Field(default_factory=list)
    """Hosts (host or host:port, shell-style patterns) spec.tracking.mlflow.trackingUri may name,
    comma-separated; empty allows any host."""
    tracking_http_credentials_hosts: CsvList = Field(default_factory=list)
    """Hosts (host or host:port, shell-style patterns) to which MLflow credentials may go over plain
    http; elsewhere a tracking URI with credentials must be https. Empty: https only."""
    allowed_hub_endpoints: CsvList = Field(default_factory=list)
    """Hub endpoints (https://host[:port]) a job may set as HF_ENDPOINT through spec.podTemplate;
    empty: the default hub only."""
    allowed_object_store_endpoints: CsvList = Field(default_factory=list)
    """Object-store endpoints (https://host[:port]) a job may name in spec.objectStore.endpoint, or
    set as AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 through spec.podTemplate; empty: the store's
    default only."""
    allowed_registries: CsvList = Field(default_factory=list)
    """OCI registries (host or host:port, shell-style patterns) an oci:// spec.output.uri may name,
    comma-separated; empty refuses oci:// outputs."""
    plain_http_registries: CsvList = Field(default_factory=list)
    """Registries (host or host:port, shell-style patterns) a job may reach over plain http
    (spec.output.registry.plainHttp), such as the local cluster's; empty: https only."""

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
