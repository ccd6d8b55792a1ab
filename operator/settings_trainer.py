"""How the operator runs trainers: the image, the pod's identity and security context, its
mounts, its NetworkPolicy, how a group runs, and the Validating phase's pod."""

from __future__ import annotations

import ipaddress
from typing import Final, Literal

from pydantic import Field, field_validator

from kubetune.api.contract import (
    CONFIG_MOUNT_PATH,
    DEFAULT_PVC_ROOT,
    TRAINER_COMMAND,
)
from kubetune.api.models import Quantity
from kubetune.operator.settings_types import CsvList, IntCsvList, OptionalInt, SettingsGroup

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


class TrainerSettings(SettingsGroup):
    """The trainer's pods and their network."""

    trainer_image: str = "kubetune/trainer:0.1.0"
    """Trainer image for jobs that set no spec.image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Pull policy of the trainer container."""
    trainer_network_policy: bool = True
    """Give each trainer pod a NetworkPolicy: no ingress, egress to the cluster's DNS and the
    CIDRs."""
    trainer_egress_cidrs: CsvList = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    """Where trainer pods may connect (besides DNS), comma-separated CIDRs."""
    trainer_egress_except: CsvList = Field(default_factory=lambda: list(DEFAULT_EGRESS_EXCEPT))
    """Addresses blocked within those CIDRs (default: private, shared, loopback and link-local
    ranges and every known cloud metadata address); only those inside a CIDR are applied to it."""
    trainer_cluster_cidrs: CsvList = Field(default_factory=list)
    """The cluster's pod and service CIDRs, blocked within the egress CIDRs like
    trainer_egress_except (name them where they lie outside the private ranges)."""
    trainer_dns_namespace_selector: dict[str, str] = Field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "kube-system"}
    )
    """Labels of the namespace of the cluster's DNS pods (JSON object)."""
    trainer_dns_pod_selector: dict[str, str] = Field(
        default_factory=lambda: {"k8s-app": "kube-dns"}
    )
    """Labels of the cluster's DNS pods (JSON object; CoreDNS keeps kube-dns's)."""
    trainer_dns_cidrs: CsvList = Field(default_factory=list)
    """More DNS servers trainer pods may ask on port 53, as CIDRs (a node-local DNS cache's address,
    such as 169.254.20.10/32)."""
    trainer_apiserver_cidrs: CsvList = Field(default_factory=list)
    """The API server's endpoint addresses (kubectl get endpoints kubernetes), as CIDRs trainer pods
    may reach on trainer_apiserver_ports to report progress where they lie inside an excepted range;
    empty: no such rule."""
    trainer_apiserver_ports: IntCsvList = Field(default_factory=lambda: [443, 6443])
    """The API server's ports, for trainer_apiserver_cidrs (comma-separated)."""
    trainer_download_allowed_cidrs: CsvList = Field(default_factory=list)
    """Private, loopback or link-local addresses the trainer may download datasets from
    (comma-separated CIDRs); every other non-public address is refused."""
    trainer_command: str = Field(TRAINER_COMMAND, min_length=1)
    """The trainer's executable in the trainer image (given --config FILE)."""
    group_workload: Literal["job", "jobset"] = "job"
    """What runs a multi-pod group (resources.nodes > 1): job, an Indexed Job beside a headless
    Service with the operator restarting the group; jobset, a JobSet (jobset.x-k8s.io/v1alpha2) that
    restarts it, where its CRD is installed (else the Indexed Job, with a warning)."""
    validation_cpu_request: Quantity = "100m"
    """CPU request of the Validating phase's pod."""
    validation_cpu_limit: Quantity = "2"
    """CPU limit of the Validating phase's pod."""
    validation_memory_request: Quantity = "256Mi"
    """Memory request of the Validating phase's pod."""
    validation_memory_limit: Quantity = "4Gi"
    """Memory limit of the Validating phase's pod (tokenizer, tokenized sample)."""
    validation_ephemeral_storage_request: Quantity = "512Mi"
    """Ephemeral-storage request of the Validating phase's pod."""
    validation_ephemeral_storage_limit: Quantity = "10Gi"
    """Ephemeral-storage limit of the Validating phase's pod (downloaded tokenizer and dataset,
    logs); past it the kubelet evicts the pod."""
    validation_active_deadline_seconds: int = Field(1800, ge=1)
    """The Validating phase fails after this many seconds (its Job's deadline)."""
    trainer_service_account: str = Field("default", min_length=1)
    """The ServiceAccount of trainer pods (one per namespace, never made per job; the namespace's
    default by default). Its token is not mounted: the pod gets only a progress token of
    progress_audience, which the apiserver refuses."""
    # The restricted Pod Security profile by default. The local cluster runs pod commands as the
    # host user and can't honour runAsNonRoot for processes that aren't images, so it turns these
    # down explicitly (KUBETUNE_RUN_AS_NON_ROOT=false).
    run_as_non_root: bool = True
    """Set runAsNonRoot on the trainer pod."""
    run_as_user: OptionalInt = Field(1000, ge=0)
    """runAsUser of the trainer pod; empty leaves it unset."""
    fs_group: OptionalInt = Field(1000, ge=0)
    """fsGroup of the trainer pod; empty leaves it unset."""
    config_mount_path: str = CONFIG_MOUNT_PATH
    """Where the trainer config ConfigMap is mounted."""
    pvc_root: str = DEFAULT_PVC_ROOT
    """Where claims named by pvc:// URIs are mounted."""

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
