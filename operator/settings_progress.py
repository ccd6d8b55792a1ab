"""The progress endpoint: where trainers report, its TLS, who may reach it, and the token
the trainer presents."""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from kubetune.api.contract import (
    PROGRESS_AUDIENCE,
)
from kubetune.operator.settings_types import OptionalInt, OptionalStr, SettingsGroup


class ProgressEndpointSettings(SettingsGroup):
    """The operator's progress endpoint, and the trainer's token for it."""

    progress_interval_seconds: PositiveFloat = 10.0
    """Least seconds between a trainer's progress reports, and between the operator's writes of one
    job's status.progress."""
    progress_port: OptionalInt = Field(8443, ge=1, le=65535)
    """Port of the progress endpoint (HTTPS, POST /v1/progress) trainers report to; empty: none
    (trainers then report nothing)."""
    progress_reuse_port: bool = False
    """Bind the progress port with SO_REUSEPORT, so replicas on one host share it as a Service
    shares them (the local cluster's tests; a pod has its own port)."""
    progress_url: OptionalStr = None
    """The progress endpoint's URL as trainer pods reach it (the chart's Service:
    https://<release>-progress.<namespace>.svc:8443/v1/progress); empty: trainers report no
    progress."""
    progress_tls_cert_file: OptionalStr = None
    """The progress endpoint's serving certificate (PEM); empty: plain HTTP."""
    progress_tls_key_file: OptionalStr = None
    """The serving certificate's private key (PEM)."""
    progress_ca_bundle: OptionalStr = None
    """The CA certificate (PEM text) that signed the serving certificate: written into each
    trainer's config, the only one it trusts for the progress URL; empty: the trainer trusts its
    system's CAs."""
    progress_peer_namespace_selector: dict[str, str] = Field(default_factory=dict)
    """Labels of the operator's namespace, for the trainer NetworkPolicy's rule to the progress port
    (JSON object; with progress_peer_pod_selector; empty: no rule)."""
    progress_peer_pod_selector: dict[str, str] = Field(default_factory=dict)
    """Labels of the operator's pods, for that rule (JSON object)."""
    progress_audience: str = Field(PROGRESS_AUDIENCE, min_length=1)
    """Audience of the trainer's projected progress token (TokenReview checks it; the apiserver
    accepts no token of this audience)."""
    progress_token_expiration_seconds: int = Field(600, ge=600)
    """Lifetime of the progress token (the kubelet renews it at 80%)."""
    progress_reviews_per_second: PositiveFloat = 20.0
    """TokenReviews the progress endpoint may ask for per second, all callers together (a known
    token is answered from a cache): beyond it, 429."""
