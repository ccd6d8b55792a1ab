"""Operator configuration from the environment (prefix ``KUBETUNE_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubetune.operator.settings_policy import TenantSettings
from kubetune.operator.settings_progress import ProgressEndpointSettings
from kubetune.operator.settings_trainer import TrainerSettings
from kubetune.operator.settings_types import CsvList, OptionalInt, OptionalStr


class OperatorSettings(TenantSettings, TrainerSettings, ProgressEndpointSettings, BaseSettings):
    """Everything a deployment may tune; every field maps to ``KUBETUNE_<FIELD_NAME>``. The
    fields of each concern live with it (``settings_policy``, ``settings_trainer``,
    ``settings_progress``); here, how the operator itself runs: what it watches, its workers,
    watches, rechecks, logs, metrics and Lease."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", frozen=True, extra="ignore")

    namespaces: CsvList = Field(
        default_factory=list,
        description="Namespaces to watch, comma-separated; empty watches the whole cluster.",
    )
    max_workers: int = Field(
        default=20, ge=1, description="Handlers that may run at once (kopf's max_workers)."
    )
    liveness_endpoint: OptionalStr = Field(
        default="http://0.0.0.0:8080/healthz",
        description="kopf's liveness probe endpoint; empty turns it off.",
    )
    json_logs: bool = Field(default=False, description="Log as JSON lines (kopf's JSON format).")
    verbose: bool = Field(default=False, description="Debug logging.")
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
