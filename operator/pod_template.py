"""``spec.podTemplate``: which of its fields and values the settings allow (and which none can),
and how what is allowed is merged under kubetune's own pod and container fields, applied last."""

from __future__ import annotations

import copy
import posixpath
from typing import Any, Final

from kubetune.api.contract import (
    ADAPTER_REGISTRY_AUTH_MOUNT_PATH,
    REGISTRY_AUTH_MOUNT_PATH,
    TERMINATION_MESSAGE_PATH,
)
from kubetune.api.models import PodTemplateOverrides
from kubetune.operator.objects import Manifest
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.settings_policy import (
    ENDPOINT_ENV,
    NEVER_CONTAINER_FIELDS,
    NEVER_ENV,
    NEVER_POD_FIELDS,
)

#: How a refusal names who refused.
SETTING: Final = "the operator's settings"
#: Volume sources that stay inside the pod's namespace; any other (hostPath, nfs, csi, ...)
#: reaches the node or storage the job's creator was never given.
SAFE_VOLUME_SOURCES: Final = frozenset(
    {"emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected", "downwardAPI",
     "ephemeral"}
)  # fmt: skip
#: Pod fields kubetune sets and nothing overrides.
_OWN_POD_FIELDS: Final = (
    "serviceAccountName",
    "automountServiceAccountToken",
    "securityContext",
    "restartPolicy",
)
_OWN_CONTAINER_FIELDS: Final = (
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "securityContext",
    "terminationMessagePath",
    "terminationMessagePolicy",
)
#: ``valueFrom`` sources a pod template's env may use: the pod's own fields, never a Secret's or
#: a ConfigMap's content (those would bypass the creator's admission check).
_ENV_VALUE_SOURCES: Final = frozenset({"fieldRef", "resourceFieldRef"})
#: Where the trainer's service account token is mounted (its progress reports use it).
_TOKEN_MOUNT: Final = "/var/run/secrets/kubernetes.io/serviceaccount"  # noqa: S105 -- a path


def pod_template_problems(template: PodTemplateOverrides, settings: OperatorSettings) -> list[str]:
    allowed = set(settings.allowed_pod_template_fields)
    problems = []
    for part in ("labels", "annotations"):
        if getattr(template.metadata, part) and f"metadata.{part}" not in allowed:
            problems.append(_not_allowed(f"spec.podTemplate.metadata.{part}"))
    for key, value in template.spec.items():
        field = f"spec.podTemplate.spec.{key}"
        if key in NEVER_POD_FIELDS:
            problems.append(f"{field}: never allowed (it would give the pod more than the job)")
        elif key == "containers":
            problems.extend(_containers(value, allowed, settings))
        elif key not in allowed:
            problems.append(_not_allowed(field))
        elif key == "volumes":
            problems.extend(_volumes(value))
    return problems


def _not_allowed(field: str) -> str:
    return f"{field}: not allowed by {SETTING} (KUBETUNE_ALLOWED_POD_TEMPLATE_FIELDS)"


def _containers(containers: Any, allowed: set[str], settings: OperatorSettings) -> list[str]:
    if not isinstance(containers, list):
        return ["spec.podTemplate.spec.containers: must be a list"]
    problems = []
    for index, container in enumerate(containers):
        where = f"spec.podTemplate.spec.containers[{index}]"
        if not isinstance(container, dict) or container.get("name") != "trainer":
            problems.append(f"{where}: only the trainer container (name: trainer) may be changed")
            continue
        for key in container:
            if key == "name":
                continue
            if key in NEVER_CONTAINER_FIELDS:
                problems.append(f"{where}.{key}: never allowed (kubetune sets it)")
            elif f"containers.{key}" not in allowed:
                problems.append(_not_allowed(f"{where}.{key}"))
            elif key == "env":
                problems.extend(_env(container[key], f"{where}.env", settings))
            elif key == "volumeMounts":
                problems.extend(_mounts(container[key], f"{where}.volumeMounts", settings))
    return problems


def _env(env: Any, where: str, settings: OperatorSettings) -> list[str]:
    """Plain values of allowed names only: an allowlist, since a variable the trainer's libraries
    read can send its tokens elsewhere (proxies, endpoints), let TLS be intercepted (CA bundles)
    or run the tenant's code (PYTHONPATH, LD_PRELOAD)."""
    if not isinstance(env, list):
        return [f"{where}: must be a list"]
    allowed = {name.upper() for name in settings.allowed_pod_template_env}
    problems = []
    for index, item in enumerate(env):
        field = f"{where}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"{field}: must have a name")
            continue
        name = item["name"]
        source = item.get("valueFrom")
        if source is not None:
            kinds = set(source) if isinstance(source, dict) else {"?"}
            if not kinds <= _ENV_VALUE_SOURCES:
                problems.append(
                    f"{field}.valueFrom: {', '.join(sorted(kinds - _ENV_VALUE_SOURCES))} never "
                    "allowed (Secrets reach the trainer only through the spec's secret "
                    "references)"
                )
        if name.upper() in ENDPOINT_ENV:
            problems.extend(endpoint_problems(field, name, item.get("value"), settings))
        elif name.upper() in NEVER_ENV:
            problems.append(f"{field}: {name} is never allowed (it would redirect or run code)")
        elif name.upper() not in allowed:
            problems.append(
                f"{field}: {name} is not allowed by {SETTING} (KUBETUNE_ALLOWED_POD_TEMPLATE_ENV)"
            )
    return problems


def endpoint_problems(field: str, name: str, value: Any, settings: OperatorSettings) -> list[str]:
    setting = ENDPOINT_ENV[name.upper()]
    endpoints = [e.rstrip("/") for e in getattr(settings, setting)]
    if isinstance(value, str) and value.rstrip("/") in endpoints:
        return []
    listed = ", ".join(endpoints) or "none"
    return [
        f"{field}: {name} must be one of the endpoints {SETTING} allow "
        f"(KUBETUNE_{setting.upper()}: {listed})"
    ]


def _mounts(mounts: Any, where: str, settings: OperatorSettings) -> list[str]:
    """No mount over or inside what kubetune mounts: the claims (the trainer reads, and
    publishes, what lies there), its config, /dev/shm, the termination message and the token."""
    if not isinstance(mounts, list):
        return [f"{where}: must be a list"]
    protected = [settings.pvc_root, settings.config_mount_path, "/dev/shm",
                 TERMINATION_MESSAGE_PATH, _TOKEN_MOUNT, REGISTRY_AUTH_MOUNT_PATH,
                 ADAPTER_REGISTRY_AUTH_MOUNT_PATH]  # fmt: skip
    problems = []
    for index, mount in enumerate(mounts):
        path = mount.get("mountPath") if isinstance(mount, dict) else None
        if not isinstance(path, str) or not path.startswith("/"):
            problems.append(f"{where}[{index}].mountPath: must be an absolute path")
            continue
        path = posixpath.normpath(path)
        clash = next((p for p in protected if _overlaps(path, posixpath.normpath(p))), None)
        if clash is not None:
            problems.append(
                f"{where}[{index}].mountPath: {path} is never allowed (it overlaps {clash}, "
                "which kubetune mounts)"
            )
    return problems


def _overlaps(path: str, protected: str) -> bool:
    """``path`` is ``protected``, inside it, or one of its parents (which would hide it)."""
    return (
        path == protected
        or path.startswith(protected.rstrip("/") + "/")
        or (protected.startswith(path.rstrip("/") + "/"))
    )


def _volumes(volumes: Any) -> list[str]:
    if not isinstance(volumes, list):
        return ["spec.podTemplate.spec.volumes: must be a list"]
    problems = []
    for index, volume in enumerate(volumes):
        sources = set(volume) - {"name"} if isinstance(volume, dict) else {"?"}
        unsafe = sorted(sources - SAFE_VOLUME_SOURCES)
        if unsafe:
            problems.append(
                f"spec.podTemplate.spec.volumes[{index}]: {', '.join(unsafe)} volumes are never "
                f"allowed (allowed: {', '.join(sorted(SAFE_VOLUME_SOURCES))})"
            )
        elif "projected" in sources and _projects_a_token(volume["projected"]):
            # The pod has no Kubernetes API identity: a token of any audience would give it one.
            problems.append(
                f"spec.podTemplate.spec.volumes[{index}]: projected serviceAccountToken sources "
                "are never allowed (a trainer pod has no Kubernetes API identity)"
            )
        elif "projected" in sources and _projects_a_secret(volume["projected"]):
            # Admission checks the creator may read a secret volume's Secret; a projected
            # volume's Secret sources it doesn't (CEL allows few authorization checks).
            problems.append(
                f"spec.podTemplate.spec.volumes[{index}]: projected Secret sources are never "
                "allowed (use a secret volume: its Secret must be one the job's creator may read)"
            )
    return problems


def _projects_a_token(projected: Any) -> bool:
    sources = projected.get("sources") if isinstance(projected, dict) else None
    return isinstance(sources, list) and any(
        isinstance(source, dict) and "serviceAccountToken" in source for source in sources
    )


def _projects_a_secret(projected: Any) -> bool:
    sources = projected.get("sources") if isinstance(projected, dict) else None
    return not isinstance(sources, list) or any(
        not isinstance(source, dict) or "secret" in source for source in sources
    )


# --- merging ---------------------------------------------------------------------------------


def apply_pod_template(
    pod: Manifest,
    labels: dict[str, str],
    annotations: dict[str, str],
    template: PodTemplateOverrides,
) -> tuple[Manifest, dict[str, str], dict[str, str]]:
    """The template merged under kubetune's pod: its service account, security context, the
    trainer's command, image, mounts and contract env, and its labels and annotations win."""
    merged = merge_pod_spec(pod, template.spec)
    for key in _OWN_POD_FIELDS:
        if key in pod:
            merged[key] = copy.deepcopy(pod[key])
        else:
            merged.pop(key, None)
    merged["volumes"] = _ours_win(merged.get("volumes", []), pod.get("volumes", []))
    ours = next(c for c in pod["containers"] if c["name"] == "trainer")
    for container in merged["containers"]:
        if container["name"] != "trainer":
            continue
        for key in _OWN_CONTAINER_FIELDS:
            if key in ours:
                container[key] = copy.deepcopy(ours[key])
            else:
                container.pop(key, None)
        for key in ("env", "volumeMounts"):
            container[key] = _ours_win(container.get(key, []), ours.get(key, []))
    merged_labels = {**template.metadata.labels, **labels}
    merged_annotations = {**template.metadata.annotations, **annotations}
    return merged, merged_labels, merged_annotations


def _ours_win(merged: list[Manifest], ours: list[Manifest]) -> list[Manifest]:
    by_name = {item["name"]: item for item in merged}
    by_name.update({item["name"]: copy.deepcopy(item) for item in ours})
    return list(by_name.values())


def merge_pod_spec(base: Manifest, overrides: Manifest) -> Manifest:
    """``overrides`` merged over ``base``: maps merge deeply, lists of named items (containers,
    volumes, env, ...) merge by name, other lists and scalars are replaced."""
    merged: Manifest = _merge(copy.deepcopy(base), copy.deepcopy(overrides))
    return merged


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        for key, value in override.items():
            base[key] = _merge(base[key], value) if key in base else value
        return base
    if isinstance(base, list) and isinstance(override, list) and _named(base) and _named(override):
        merged = {item["name"]: item for item in base}
        for item in override:
            merged[item["name"]] = (
                _merge(merged[item["name"]], item) if item["name"] in merged else item
            )
        return list(merged.values())
    return override


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)
