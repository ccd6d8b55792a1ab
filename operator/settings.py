"""Operator configuration from the environment (prefix ``KUBETUNE_``)."""

from __future__ import annotations

from pydantic import Field, PositiveFloat
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

    model_config = SettingsConfigDict(
        env_prefix="KUBETUNE_", frozen=True, extra="ignore", use_attribute_docstrings=True
    )

    namespaces: CsvList = Field(default_factory=list)
    """Namespaces to watch, comma-separated; empty watches the whole cluster."""
    max_workers: int = Field(20, ge=1)
    """Handlers that may run at once (kopf's max_workers)."""
    liveness_endpoint: OptionalStr = "http://0.0.0.0:8080/healthz"
    """kopf's liveness probe endpoint; empty turns it off."""
    json_logs: bool = False
    """Log as JSON lines (kopf's JSON format)."""
    verbose: bool = False
    """Debug logging."""
    watch_timeout_seconds: int = Field(300, ge=10)
    """Server-side timeout of each watch request."""
    watch_inactivity_seconds: float = Field(70.0, ge=1)
    """A watch that brings no event, not even a bookmark (the apiserver sends one about every
    minute), for this long is taken for dead and started again."""
    list_chunk_size: int = Field(50, ge=1)
    """Objects per page of the watches' first list (and after each watch restart): the most the
    operator parses at once."""
    api_timeout_seconds: PositiveFloat = 30.0
    """Timeout of each of the operator's own API requests (not the watches)."""
    status_recheck_seconds: PositiveFloat = 30.0
    """How often unfinished jobs are re-derived even without events."""
    reference_recheck_seconds: PositiveFloat = 15.0
    """How soon missing PVCs are looked for again."""
    metrics_port: OptionalInt = Field(9090, ge=1, le=65535)
    """Port of the Prometheus /metrics; empty: none."""
    metrics_auth: bool = True
    """Serve /metrics only to bearer tokens of identities that may get the non-resource URL /metrics
    (TokenReview and SubjectAccessReview, as kube-rbac-proxy does); false serves anyone who reaches
    the port."""
    leader_election: bool = True
    """Act only while holding the Lease (run two replicas, one acts at a time)."""
    lease_name: str = Field("kubetune-operator", min_length=1)
    """The Lease."""
    lease_namespace: OptionalStr = None
    """The Lease's namespace; empty: the operator pod's own (POD_NAMESPACE), else default."""
    lease_duration_seconds: int = Field(10, ge=2)
    """A Lease not renewed for this long is taken over (the takeover time)."""
    lease_renew_seconds: PositiveFloat = 2.0
    """How often the holder renews (and others look)."""
    identity: OptionalStr = None
    """This replica's name in the Lease; empty: the pod's name (POD_NAME) or host."""
