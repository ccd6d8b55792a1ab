"""The server's configuration from the environment (prefix ``KUBETUNE_SERVER_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, NonNegativeFloat, PositiveFloat
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Everything a deployment may tune; every field maps to ``KUBETUNE_SERVER_<FIELD_NAME>``
    (dicts as JSON)."""

    model_config = SettingsConfigDict(
        env_prefix="KUBETUNE_SERVER_", frozen=True, use_attribute_docstrings=True
    )

    host: str = "0.0.0.0"  # noqa: S104
    """Address to listen on."""
    port: int = 8080
    """Port to listen on."""
    default_namespace: str | None = None
    """The namespace of a request without an OpenAI-Project header; none: the header is required."""
    kubeconfig: Path | None = None
    """Where the API server is (its server URL and CA only: the server never uses a kubeconfig's
    credentials); unset: in-cluster (KUBERNETES_SERVICE_HOST and the service account's CA)."""
    ca_file: Path | None = None
    """The API server's CA in the cluster (the chart mounts the namespace's kube-root-ca.crt: the
    server's own service account token is never mounted); unset: the service account mount's
    ca.crt."""
    models: dict[str, str] = Field(default_factory=dict)
    """The base models callers may tune: OpenAI model name -> spec.model.uri."""
    job_template: dict[str, Any] = Field(default_factory=dict)
    """FineTuneJob spec fields every job created through the API starts from (quantization, lora,
    training, resources, scheduling...); the request's model, data, hyperparameters and seed go over
    it."""
    output_uri: str = "pvc://adapters/{job}"
    """spec.output.uri of a job created through the API; {job} is its name."""
    files_dir: Path = Path("/var/lib/kubetune-server/files")
    """Where uploaded files are kept, one folder per namespace (a claim's mount)."""
    max_file_bytes: int = Field(512 * 1024 * 1024, ge=1)
    """The largest file an upload may bring."""
    max_json_bytes: int = Field(1024 * 1024, ge=1024)
    """The largest JSON body a request may bring."""
    dataset_base_url: str = "http://kubetune-server.kubetune-system.svc:8080"
    """How trainer pods reach this server to download an uploaded file (through a signed, expiring
    URL that names it)."""
    signing_key_file: Path | None = None
    """A file holding the key that signs the dataset URLs (the chart mounts a Secret); unset: a
    random key per process (URLs die with it)."""
    dataset_url_seconds: int = Field(14 * 24 * 3600, ge=60)
    """How long a job's dataset URL stays valid (retries and resumed runs download again)."""
    kube_timeout_seconds: PositiveFloat = 30.0
    """Timeout of each request to the API server."""
    rate_limit_per_second: NonNegativeFloat = 50.0
    """Requests per second per caller (a token bucket of twice that); 0: off."""
    fast_http: bool = True
    """Serve with uvloop's event loop and httptools' parser (C); off: asyncio's loop and h11 (pure
    Python), the baseline of docs/performance.md."""
    console: bool = True
    """Serve the web console under /ui (docs/console.md), with each caller's own identity, as the
    API."""
    console_token_header: str | None = None
    """A header an authenticating proxy in front sets to the caller's Kubernetes bearer token (e.g.
    X-Forwarded-Access-Token); unset: the console's login page only. Set it only where every request
    passes that proxy."""
    console_namespaces: list[str] = Field(default_factory=list)
    """Namespaces the console offers to callers who may not list namespaces (each still checked with
    the caller's own access review)."""
    cache_token_file: Path | None = None
    """A file holding the server's own token, read-only on FineTuneJobs (the chart projects its
    ServiceAccount's): with it, reads are served from a watch-backed cache once the caller's own
    access review allows them; unset: every read goes to the API server with the caller's token."""
    access_allowed_ttl_seconds: NonNegativeFloat = 10.0
    """How long an allowed access review is reused for the same token, namespace and verb (a revoked
    caller keeps access at most this long)."""
    access_denied_ttl_seconds: NonNegativeFloat = 5.0
    """How long a denied access review is reused (a new grant shows at most this late)."""
