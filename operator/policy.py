"""What a FineTuneJob may ask of this cluster: the operator's settings decide, the spec proposes.

Whoever may create a FineTuneJob gets a trainer pod with kubetune's service account, command and
restricted security context, reading what the spec names in its namespace and nothing more. So
``spec.image`` and ``spec.podTemplate`` are refused unless the settings allow them (an image
pattern, a list of pod-spec fields), some fields are refused whatever the settings say, and what
is merged is merged under kubetune's own fields, which are applied last.
"""

from __future__ import annotations

import fnmatch
import urllib.parse

from kubetune.api.models import FineTuneJobSpec, RegistrySpec
from kubetune.api.uris import CLUSTER_SCHEMES, oci_reference, parse_uri
from kubetune.operator.pod_template import SETTING, endpoint_problems, pod_template_problems
from kubetune.operator.settings import OperatorSettings


def policy_problems(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    """What the spec asks that this cluster refuses, one ``field: why`` line each."""
    return [
        *_denied_options(spec, settings),
        *_cluster_uris(spec),
        *_tracking(spec, settings),
        *_object_store(spec, settings),
        *_registry(spec, settings),
        *_image(spec, settings),
        *(
            pod_template_problems(spec.pod_template, settings)
            if spec.pod_template is not None
            else []
        ),
    ]


def _host_matches(host: str, port: int | None, patterns: list[str]) -> bool:
    names = {host.lower(), f"{host.lower()}:{port}" if port is not None else host.lower()}
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns for name in names)


def _tracking(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    """The MLflow server gets the run's credentials: only a host the settings allow, and only
    over https (unless the settings name the host for plain http)."""
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is None:
        return []
    field = "spec.tracking.mlflow.trackingUri"
    parts = urllib.parse.urlsplit(mlflow.tracking_uri)
    host, port = parts.hostname or "", parts.port
    shown = f"{host}:{port}" if port is not None else host
    problems = []
    allowed = settings.allowed_tracking_hosts
    if allowed and not _host_matches(host, port, allowed):
        problems.append(
            f"{field}: host {shown!r} is not allowed by {SETTING} "
            f"(KUBETUNE_ALLOWED_TRACKING_HOSTS: {', '.join(allowed)})"
        )
    credentials = [
        ref
        for ref in (mlflow.username_secret_ref, mlflow.password_secret_ref, mlflow.token_secret_ref)
        if ref is not None
    ]
    if (
        credentials
        and parts.scheme != "https"
        and not _host_matches(host, port, settings.tracking_http_credentials_hosts)
    ):
        problems.append(
            f"{field}: credentials (usernameSecretRef, passwordSecretRef, tokenSecretRef) go "
            f"only over https; {shown!r} is plain http (denied by {SETTING}, "
            "KUBETUNE_TRACKING_HTTP_CREDENTIALS_HOSTS)"
        )
    return problems


def _object_store(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    """The store's credentials go to its endpoint: only one the settings allow."""
    store = spec.object_store
    if store is None or store.endpoint is None:
        return []
    return endpoint_problems(
        "spec.objectStore.endpoint", "AWS_ENDPOINT_URL", store.endpoint, settings
    )


def _registry(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    """An oci:// output or starting adapter gets the registry's login: only a registry the
    settings allow, and plain http only to one they name for it."""
    problems = []
    if spec.output.is_oci:
        problems += _one_registry(
            "spec.output", spec.output.uri, spec.output.registry, settings, pull=False
        )
    adapter = spec.model.adapter
    if adapter is not None and adapter.uri.startswith("oci://"):
        problems += _one_registry(
            "spec.model.adapter", adapter.uri, adapter.registry, settings, pull=True
        )
    return problems


def _one_registry(
    where: str, uri: str, registry: RegistrySpec | None, settings: OperatorSettings, *, pull: bool
) -> list[str]:
    host = oci_reference(uri, f"{where}.uri", pull=pull).host
    name, _, port = host.partition(":")
    port_number = int(port) if port else None
    problems = []
    allowed = settings.allowed_registries
    if not _host_matches(name, port_number, allowed):
        listed = ", ".join(allowed) or "none"
        problems.append(
            f"{where}.uri: registry {host!r} is not allowed by {SETTING} "
            f"(KUBETUNE_ALLOWED_REGISTRIES: {listed})"
        )
    plain = settings.plain_http_registries
    if registry is not None and registry.plain_http and not _host_matches(name, port_number, plain):
        problems.append(
            f"{where}.registry.plainHttp: registry {host!r} may be reached only over https "
            f"(plain http denied by {SETTING}, KUBETUNE_PLAIN_HTTP_REGISTRIES: "
            f"{', '.join(plain) or 'none'})"
        )
    return problems


def _denied_options(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    denied = {option.lower() for option in settings.denied_options}
    used = {
        "trustremotecode": ("spec.model.trustRemoteCode", spec.model.trust_remote_code),
        "pushtohub": ("spec.output.pushToHub", spec.output.push_to_hub is not None),
        "merge": ("spec.output.merge", spec.output.merge),
    }
    return [
        f"{field}: denied by {SETTING} (KUBETUNE_DENIED_OPTIONS)"
        for option, (field, is_used) in used.items()
        if option in denied and is_used
    ]


def _cluster_uris(spec: FineTuneJobSpec) -> list[str]:
    """Local paths and file:// mean a path on the node: only `kubetune train` may use them."""
    problems = []
    for field, uri, _ in spec.uris():
        parsed = parse_uri(uri, CLUSTER_SCHEMES | {"file"}, field, oci_digest=True)
        hub_id = parsed.could_be_hub_id and not field.startswith("spec.output.")
        if parsed.scheme not in CLUSTER_SCHEMES and not hub_id:
            problems.append(
                f"{field}: {uri!r} is a path on the node; in a cluster use pvc://<claim>/<path> "
                "(local paths and file:// are for `kubetune train`)"
            )
    return problems


def _image(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    if spec.image is None or any(
        fnmatch.fnmatchcase(spec.image, p) for p in settings.allowed_images
    ):
        return []
    allowed = ", ".join(settings.allowed_images) or "none: the default trainer image only"
    return [f"spec.image: {spec.image!r} is not allowed by {SETTING} (allowed: {allowed})"]
