"""A container's environment and command line, resolved as a kubelet does:
``env`` (with ``valueFrom``), ``envFrom``, the service variables, and ``$(VAR)``
references in env values, command and args.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from kubetune.local.rest import JSON, ApiError, Rest, path_for
from kubetune.local.volumes import VolumeNotReady, field_value, object_data, resource_value

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, variables: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: unknown references stay as written, ``$$`` escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return variables.get(name, match.group(0))

    return _REFERENCE.sub(replace, value)


class EnvResolver:
    """Resolves env for the containers of one pod, caching ConfigMaps and Secrets it reads."""

    def __init__(self, rest: Rest, pod: JSON, host_ip: str, pod_ip: str | None = None) -> None:
        self.rest = rest
        self.pod = pod
        self.namespace: str = pod["metadata"]["namespace"]
        self.host_ip = host_ip
        self.pod_ip = pod_ip or host_ip
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def _data(self, resource: str, name: str) -> dict[str, str] | None:
        key = (resource, name)
        if key not in self._cache:
            try:
                obj = self.rest.get(path_for(self.namespace, resource, name))
                self._cache[key] = {
                    k: v.decode(errors="replace") for k, v in object_data(obj).items()
                }
            except ApiError as error:
                if error.status != 404:
                    raise
                return None  # not cached: the kubelet sees it once it is created
        return self._cache[key]

    def _key(self, resource: str, ref: JSON) -> str | None:
        data = self._data(resource, ref["name"])
        optional = bool(ref.get("optional", False))
        if data is None:
            if optional:
                return None
            raise VolumeNotReady(f"{resource[:-1]} {ref['name']!r} not found")
        if ref["key"] not in data:
            if optional:
                return None
            self._cache.pop((resource, ref["name"]), None)  # read it again on the next try
            raise VolumeNotReady(f"key {ref['key']!r} not found in {resource[:-1]} {ref['name']!r}")
        return data[ref["key"]]

    def resolve(self, container: JSON, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (PATH, HOME, service variables) overlaid by envFrom, then env."""
        env = dict(base)
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                resource, ref = "configmaps", source["configMapRef"]
            else:
                resource, ref = "secrets", source["secretRef"]
            data = self._data(resource, ref["name"])
            if data is None:
                if ref.get("optional", False):
                    continue
                raise VolumeNotReady(f"{resource[:-1]} {ref['name']!r} not found")
            env.update({prefix + k: v for k, v in data.items()})
        for variable in container.get("env", []):
            name = variable["name"]
            if "valueFrom" not in variable:
                env[name] = expand(variable.get("value", ""), env)
                continue
            source = variable["valueFrom"]
            value: str | None
            if "fieldRef" in source:
                value = field_value(
                    self.pod, source["fieldRef"]["fieldPath"], self.host_ip, self.pod_ip
                )
            elif "resourceFieldRef" in source:
                value = resource_value(self.pod, container["name"], source["resourceFieldRef"])
            elif "configMapKeyRef" in source:
                value = self._key("configmaps", source["configMapKeyRef"])
            elif "secretKeyRef" in source:
                value = self._key("secrets", source["secretKeyRef"])
            else:
                raise ValueError(f"env {name!r}: unsupported valueFrom {sorted(source)}")
            if value is not None:
                env[name] = value
        return env


def command_line(container: JSON, env: Mapping[str, str]) -> list[str]:
    """``command`` + ``args`` with ``$(VAR)`` expanded; there is no image entrypoint."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if not container.get("command"):
        raise ValueError(
            f"container {container['name']!r} has no command: the local node runs no "
            "images, so it cannot fall back to an image entrypoint"
        )
    return [expand(part, env) for part in argv]
