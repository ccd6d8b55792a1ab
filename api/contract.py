"""The operator↔trainer pod contract, in one place.

Everything both sides of a trainer pod must agree on: the container's name, where its config and
claims are mounted, the environment variables that carry them, where the termination message
goes, the exit codes and the condition types and reasons the operator reports from them. The
operator renders pods from these names, the trainer reads them, the kubelet honours
them; nothing else spells them out.
"""

from __future__ import annotations

import enum
from typing import Final

# --- the pod -----------------------------------------------------------------------------------

TRAINER_CONTAINER: Final = "trainer"
TRAINER_COMMAND: Final = "kubetune-trainer"
#: ``kubetune-trainer preflight --config FILE``: the Validating phase's CPU pod (same image,
#: same config); its termination message is a TrainerResult with ``estimate``.
PREFLIGHT_SUBCOMMAND: Final = "preflight"
#: The resolved TrainerConfig, as a key of the job's ConfigMap and a file in its mount.
CONFIG_FILE: Final = "config.yaml"
CONFIG_MOUNT_PATH: Final = "/etc/kubetune"
#: Claims named by pvc:// URIs are mounted at ``$KUBETUNE_PVC_ROOT/<claim>``.
PVC_ROOT_ENV: Final = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT: Final = "/mnt/pvc"
#: The private, loopback or link-local networks (comma-separated CIDRs) the trainer may download
#: from; every other address that isn't public is refused (the operator's
#: ``trainer_download_allowed_cidrs``; always set, so a pod template can't widen it).
DOWNLOAD_ALLOWED_CIDRS_ENV: Final = "KUBETUNE_DOWNLOAD_ALLOWED_CIDRS"
#: The model's read token, from ``spec.model.tokenSecretRef``.
TOKEN_ENV: Final = "HF_TOKEN"  # noqa: S105 -- the variable's name, not its value
#: The hub push token, from ``spec.output.pushToHub.tokenSecretRef``.
PUSH_TOKEN_ENV: Final = "HF_PUSH_TOKEN"  # noqa: S105 -- the variable's name, not its value
#: MLflow's credentials, from ``spec.tracking.mlflow``'s secret references (the names MLflow's
#: client reads).
MLFLOW_USERNAME_ENV: Final = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV: Final = "MLFLOW_TRACKING_PASSWORD"  # noqa: S105 -- a name, not a value
MLFLOW_TOKEN_ENV: Final = "MLFLOW_TRACKING_TOKEN"  # noqa: S105 -- a name, not a value
#: The object store's credentials and endpoint, from ``spec.objectStore`` (the names the AWS
#: SDKs, s3fs and boto3 read).
AWS_ACCESS_KEY_ID_ENV: Final = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY_ENV: Final = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 -- a name, not a value
AWS_SESSION_TOKEN_ENV: Final = "AWS_SESSION_TOKEN"  # noqa: S105 -- a name, not a value
AWS_ENDPOINT_URL_ENV: Final = "AWS_ENDPOINT_URL"
AWS_REGION_ENV: Final = "AWS_DEFAULT_REGION"
#: The registry login of an oci:// output: the ``.dockerconfigjson`` key of
#: ``spec.output.registry.credentialsSecretRef``, mounted read-only at REGISTRY_AUTH_MOUNT_PATH,
#: its file named by REGISTRY_AUTH_ENV (the variable podman and skopeo read too).
REGISTRY_AUTH_ENV: Final = "REGISTRY_AUTH_FILE"
REGISTRY_AUTH_MOUNT_PATH: Final = "/var/run/kubetune/registry"
REGISTRY_AUTH_KEY: Final = ".dockerconfigjson"
#: The same for ``spec.model.adapter.registry.credentialsSecretRef`` (the registry an oci://
#: starting adapter is pulled from).
ADAPTER_REGISTRY_AUTH_ENV: Final = "KUBETUNE_ADAPTER_REGISTRY_AUTH_FILE"
ADAPTER_REGISTRY_AUTH_MOUNT_PATH: Final = "/var/run/kubetune/adapter-registry"
# Distributed training (resources.gpus > 1 or resources.nodes > 1). The pod's command stays
# TRAINER_COMMAND; the trainer starts its ranks through torch.distributed.run from these.
#: host:port of the c10d rendezvous (rank 0's pod, through the job's headless Service).
RENDEZVOUS_ENDPOINT_ENV: Final = "KUBETUNE_RENDEZVOUS_ENDPOINT"
#: One id per group attempt, so a restarted group never joins a stale rendezvous.
RENDEZVOUS_ID_ENV: Final = "KUBETUNE_RENDEZVOUS_ID"
RENDEZVOUS_PORT: Final = 29400
#: This pod's place in the group: set by Kubernetes on the pods of an Indexed Job.
NODE_RANK_ENV: Final = "JOB_COMPLETION_INDEX"
#: Kubernetes' label on an Indexed Job's pods with their index (rank 0's pod carries the result).
COMPLETION_INDEX_LABEL: Final = "batch.kubernetes.io/job-completion-index"
#: Kubernetes' label on a Job's pods with the Job's uid: the rendezvous id (one Job per attempt).
CONTROLLER_UID_LABEL: Final = "batch.kubernetes.io/controller-uid"

#: The trainer's progress goes to the operator (``POST`` of a Progress object over HTTPS), with a
#: projected ServiceAccount token of kubetune's own audience, bound to the pod: the apiserver
#: accepts no such token, so the pod has no Kubernetes API identity at all.
PROGRESS_PATH: Final = "/v1/progress"
#: The token's audience (the operator's ``progress_audience`` by default).
PROGRESS_AUDIENCE: Final = "kubetune.io/progress"
#: Where the pod's progress token is mounted (a projected volume; the kubelet renews it).
PROGRESS_TOKEN_DIR: Final = "/var/run/secrets/kubetune.io/progress"  # noqa: S105 -- a path
PROGRESS_TOKEN_FILE: Final = "token"  # noqa: S105 -- a file's name, not a token
#: The volume that holds it.
PROGRESS_TOKEN_VOLUME: Final = "progress-token"  # noqa: S105 -- a volume's name
#: The largest progress body the operator reads (a Progress with its whole curve history is
#: well under it).
PROGRESS_BODY_LIMIT: Final = 64 * 1024

#: Where the trainer writes its result; a laptop run may point it elsewhere.
TERMINATION_LOG_ENV: Final = "KUBETUNE_TERMINATION_LOG"
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
#: Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT: Final = 4096

# --- labels and annotations on every child ------------------------------------------------------

JOB_LABEL: Final = "kubetune.io/job"
#: The FineTuneJob's uid: what a group's NetworkPolicy and Service select by (``JOB_LABEL`` is a
#: shortened name, which another job of the namespace could share).
JOB_UID_LABEL: Final = "kubetune.io/job-uid"
#: The full FineTuneJob name (labels are capped at 63 characters, names are not).
FINETUNEJOB_ANNOTATION: Final = "kubetune.io/finetunejob"
#: Which part of a job a pod is: ``trainer``, or ``validator`` (the Validating phase's pod).
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
VALIDATOR_COMPONENT: Final = "validator"
#: On a multi-pod group's Job: which group attempt it runs (1, 2, ...); one Job per attempt.
ATTEMPT_ANNOTATION: Final = "kubetune.io/attempt"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "kubetune-operator"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"

# --- exit codes --------------------------------------------------------------------------------


class ExitCode(enum.IntEnum):
    """The trainer's exit codes: they tell the Job which failures a retry can't fix."""

    SUCCEEDED = 0
    UNEXPECTED = 1
    INVALID_CONFIG = 2
    DATASET = 3
    MODEL = 4
    OUT_OF_MEMORY = 5
    #: The loss became NaN or infinite: the same data and settings would diverge again.
    DIVERGED = 6
    #: SIGTERM (128 + 15): a checkpoint was written and the next pod resumes from it.
    PREEMPTED = 143


#: Exit codes a retry can't fix: the operator's podFailurePolicy fails the Job on these at once.
NON_RETRIABLE_EXIT_CODES: Final[tuple[int, ...]] = (
    ExitCode.INVALID_CONFIG,
    ExitCode.DATASET,
    ExitCode.MODEL,
    ExitCode.OUT_OF_MEMORY,
    ExitCode.DIVERGED,
)

# --- conditions --------------------------------------------------------------------------------


class ConditionType(enum.StrEnum):
    READY = "Ready"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


#: In the order they are listed in status.
CONDITION_TYPES: Final = tuple(ConditionType)


class Reason(enum.StrEnum):
    """Every reason kubetune puts on a condition, an Event or ``status.result``."""

    # The trainer's outcomes (its termination message and exit code).
    SUCCEEDED = "Succeeded"
    TRAINER_ERROR = "TrainerError"
    INVALID_CONFIG = "InvalidConfig"
    DATASET_ERROR = "DatasetError"
    MODEL_ERROR = "ModelError"
    OUT_OF_MEMORY = "OutOfMemory"
    DIVERGED = "Diverged"
    PREEMPTED = "Preempted"
    # The operator's, before any pod runs.
    INVALID_SPEC = "InvalidSpec"
    DENIED = "Denied"
    NAME_CONFLICT = "NameConflict"
    #: The API refused a child for another reason than an invalid value (quota, admission).
    REJECTED = "Rejected"
    MISSING_REFERENCE = "MissingReference"
    # The Validating phase (kubetune-trainer preflight in a CPU Job).
    VALIDATING = "Validating"
    VALIDATED = "Validated"
    # From the Job and its pods.
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    FINISHING = "Finishing"
    RETRYING = "Retrying"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_CONTAINER_ERROR = "CreateContainerError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    OOM_KILLED = "OOMKilled"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    #: An Event: the settings ask for JobSet, whose CRD is not installed (an Indexed Job runs).
    JOBSET_UNAVAILABLE = "JobSetUnavailable"
    # The False side of conditions that didn't happen.
    IN_PROGRESS = "InProgress"
    NOT_SUCCEEDED = "NotSucceeded"
    NO_FAILURE = "NoFailure"
    NOT_SUSPENDED = "NotSuspended"


#: Failure reasons by exit code, as they appear in the termination message and in conditions.
EXIT_CODE_REASONS: Final[dict[ExitCode, Reason]] = {
    ExitCode.UNEXPECTED: Reason.TRAINER_ERROR,
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.DATASET: Reason.DATASET_ERROR,
    ExitCode.MODEL: Reason.MODEL_ERROR,
    ExitCode.OUT_OF_MEMORY: Reason.OUT_OF_MEMORY,
    ExitCode.DIVERGED: Reason.DIVERGED,
    ExitCode.PREEMPTED: Reason.PREEMPTED,
}
