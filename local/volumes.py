"""Materializes a pod's volumes as host directories that bubblewrap binds at
their mount paths, the way a kubelet's volume manager does.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.local.rest import JSON, ApiError, Rest, path_for

log = logging.getLogger(__name__)

# The files of configMap/secret/projected volumes are written read-only, as a
# kubelet does, so mounts of them are read-only whatever the volumeMount says.
_READ_ONLY_KINDS = ("configMap", "secret", "downwardAPI", "projected")


class VolumeNotReady(Exception):
    """A referenced object is missing or a claim is unbound; the kubelet retries these."""


@dataclass(frozen=True)
class HostVolume:
    """Where a volume lives on the host, and whether mounts must be read-only."""

    path: Path
    read_only: bool


def field_value(pod: JSON, field_path: str, host_ip: str, pod_ip: str | None = None) -> str:
    """The value of a downward-API ``fieldRef`` on ``pod``."""
    meta = pod["metadata"]
    pod_ip = pod_ip or host_ip
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": host_ip,
        "status.podIP": pod_ip,
        "status.hostIPs": host_ip,
        "status.podIPs": pod_ip,
    }
    if field_path in simple:
        return str(simple[field_path])
    for prefix, mapping in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        values: dict[str, str] = meta.get(mapping) or {}
        if field_path == prefix:
            return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        if field_path.startswith(prefix + "['") and field_path.endswith("']"):
            return values.get(field_path[len(prefix) + 2 : -2], "")
    raise ValueError(f"unsupported fieldRef {field_path!r}")


def resource_value(pod: JSON, container_name: str | None, ref: JSON) -> str:
    """The value of a downward-API ``resourceFieldRef`` (limits fall back to requests)."""
    containers = pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])
    name = ref.get("containerName") or container_name
    container: JSON = next((c for c in containers if c["name"] == name), {})
    section, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    value = resources.get(section, {}).get(resource) or resources.get("requests", {}).get(resource)
    return str(value if value is not None else "0")


class VolumeBuilder:
    """Builds the host side of each volume of one pod under ``pod_dir/volumes``."""

    def __init__(
        self,
        rest: Rest,
        pod: JSON,
        pod_dir: Path,
        host_ip: str,
        memory_dir: Path,
        *,
        pod_ip: str | None = None,
    ) -> None:
        self.rest = rest
        self.memory_dir = memory_dir
        self.pod = pod
        self.namespace: str = pod["metadata"]["namespace"]
        self.pod_dir = pod_dir
        self.host_ip = host_ip
        self.pod_ip = pod_ip or host_ip
        # Token files written so far, with their projection, for refresh_tokens().
        self.tokens: list[tuple[Path, JSON]] = []

    def build_all(self) -> dict[str, HostVolume]:
        self.tokens = []
        return {v["name"]: self.build(v) for v in self.pod["spec"].get("volumes", [])}

    def build(self, volume: JSON) -> HostVolume:
        name = volume["name"]
        target = self.pod_dir / "volumes" / name
        builders: dict[str, Callable[[Any, Path], HostVolume]] = {
            "emptyDir": self._empty_dir,
            "configMap": self._config_map,
            "secret": self._secret,
            "downwardAPI": self._downward_api,
            "projected": self._projected,
            "persistentVolumeClaim": self._claim,
            "hostPath": self._host_path,
        }
        for kind, builder in builders.items():
            if kind in volume:
                return builder(volume[kind] or {}, target)
        kinds = sorted(set(volume) - {"name"})
        raise ValueError(f"volume {name!r}: unsupported volume type {kinds}")

    # -- kinds ----------------------------------------------------------------

    def _empty_dir(self, spec: JSON, target: Path) -> HostVolume:
        if spec.get("medium") == "Memory":
            # A directory on the host's /dev/shm tmpfs: memory-backed like the real
            # thing, and shared by all containers of the pod (a per-container tmpfs
            # mount would not be).
            target = self.memory_dir / target.name
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o777)  # as a kubelet makes it: whatever user the containers run as
        return HostVolume(target, read_only=False)

    def _config_map(self, spec: JSON, target: Path) -> HostVolume:
        data = self._object_data("configmaps", spec.get("name", ""), spec.get("optional", False))
        files = _select(data, spec.get("items"), spec.get("optional", False))
        _write_files(target, files, spec.get("defaultMode", 0o644))
        return HostVolume(target, read_only=True)

    def _secret(self, spec: JSON, target: Path) -> HostVolume:
        data = self._object_data("secrets", spec.get("secretName", ""), spec.get("optional", False))
        files = _select(data, spec.get("items"), spec.get("optional", False))
        _write_files(target, files, spec.get("defaultMode", 0o644))
        return HostVolume(target, read_only=True)

    def _downward_api(self, spec: JSON, target: Path) -> HostVolume:
        _write_files(
            target, self._downward_files(spec.get("items", [])), spec.get("defaultMode", 0o644)
        )
        return HostVolume(target, read_only=True)

    def _projected(self, spec: JSON, target: Path) -> HostVolume:
        files: dict[str, tuple[bytes, int | None]] = {}
        for source in spec.get("sources", []):
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                files[token["path"]] = (self._token(token).encode(), None)
                self.tokens.append((target / token["path"], token))
            elif "configMap" in source:
                ref = source["configMap"]
                data = self._object_data("configmaps", ref["name"], ref.get("optional", False))
                files.update(_select(data, ref.get("items"), ref.get("optional", False)))
            elif "secret" in source:
                ref = source["secret"]
                data = self._object_data("secrets", ref["name"], ref.get("optional", False))
                files.update(_select(data, ref.get("items"), ref.get("optional", False)))
            elif "downwardAPI" in source:
                files.update(self._downward_files(source["downwardAPI"].get("items", [])))
            else:
                raise ValueError(f"unsupported projected source {sorted(source)}")
        _write_files(target, files, spec.get("defaultMode", 0o644))
        return HostVolume(target, read_only=True)

    def _claim(self, spec: JSON, target: Path) -> HostVolume:
        claim_name = spec["claimName"]
        claim = self._get(path_for(self.namespace, "persistentvolumeclaims", claim_name))
        if claim is None or claim.get("status", {}).get("phase") != "Bound":
            raise VolumeNotReady(f"PersistentVolumeClaim {claim_name!r} is not bound")
        volume = self.rest.get(path_for(None, "persistentvolumes", claim["spec"]["volumeName"]))
        source = volume["spec"].get("hostPath") or volume["spec"].get("local")
        if not source:
            raise ValueError(f"PersistentVolume {volume['metadata']['name']!r} has no local path")
        path = Path(source["path"])
        path.mkdir(parents=True, exist_ok=True)
        return HostVolume(path, read_only=bool(spec.get("readOnly", False)))

    def _host_path(self, spec: JSON, target: Path) -> HostVolume:
        path = Path(spec["path"])
        if spec.get("type") == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        if spec.get("type") in ("Directory", "File") and not path.exists():
            raise VolumeNotReady(f"hostPath {path} does not exist")
        return HostVolume(path, read_only=False)

    # -- helpers --------------------------------------------------------------

    def _get(self, path: str) -> JSON | None:
        try:
            return self.rest.get(path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def _object_data(self, resource: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self._get(path_for(self.namespace, resource, name))
        if obj is None:
            if optional:
                return {}
            raise VolumeNotReady(f"{resource[:-1]} {name!r} not found")
        return object_data(obj)

    def token_lifetime(self) -> float:
        """Seconds until the first token needs renewing (80% of its life, as a kubelet)."""
        return min(
            (0.8 * spec.get("expirationSeconds", 3607) for _, spec in self.tokens), default=0.0
        )

    def refresh_tokens(self) -> None:
        """Write fresh tokens in place: the volume's directory stays bind-mounted."""
        for path, spec in self.tokens:
            fresh = path.with_name(f".{path.name}.new")
            fresh.write_text(self._token(spec))
            fresh.chmod(path.stat().st_mode & 0o777)
            os.replace(fresh, path)

    def _token(self, spec: JSON) -> str:
        """A TokenRequest bound to this pod, so it dies with the pod."""
        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [spec["audience"]] if spec.get("audience") else [],
                "expirationSeconds": spec.get("expirationSeconds", 3607),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        path = path_for(self.namespace, "serviceaccounts", account, "token")
        try:
            response = self.rest.post(path, request)
        except ApiError as error:
            if error.status == 404:
                raise VolumeNotReady(f"serviceaccount {account!r} not found") from error
            raise
        return str(response["status"]["token"])

    def _downward_files(self, items: list[JSON]) -> dict[str, tuple[bytes, int | None]]:
        files: dict[str, tuple[bytes, int | None]] = {}
        for item in items:
            if "fieldRef" in item:
                value = field_value(
                    self.pod, item["fieldRef"]["fieldPath"], self.host_ip, self.pod_ip
                )
            else:
                value = resource_value(self.pod, None, item["resourceFieldRef"])
            files[item["path"]] = (value.encode(), item.get("mode"))
        return files


def object_data(obj: JSON) -> dict[str, bytes]:
    """The data of a ConfigMap or Secret, decoded to bytes."""
    data = {k: v.encode() for k, v in (obj.get("stringData") or {}).items()}
    if obj.get("kind") == "Secret" or "type" in obj:
        data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
    else:
        data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _select(
    data: dict[str, bytes], items: list[JSON] | None, optional: bool
) -> dict[str, tuple[bytes, int | None]]:
    if not items:
        return {key: (value, None) for key, value in data.items()}
    selected: dict[str, tuple[bytes, int | None]] = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise VolumeNotReady(f"key {item['key']!r} not found")
        selected[item["path"]] = (data[item["key"]], item.get("mode"))
    return selected


def _write_files(target: Path, files: dict[str, tuple[bytes, int | None]], mode: int) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    target.chmod(0o755)  # as a kubelet's: any container user may list it; files keep their mode
    for relative, (content, file_mode) in files.items():
        path = target / relative
        if not path.resolve().is_relative_to(target.resolve()):
            raise ValueError(f"volume path {relative!r} escapes the volume")
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, file_mode if file_mode is not None else mode)


def give_to_group(volume: HostVolume, gid: int) -> None:
    """A kubelet's ``fsGroup``: the volume's files belong to the group, which may read them (and
    write them, unless the volume is read-only); new files in its folders inherit the group."""
    paths = [volume.path, *volume.path.rglob("*")] if volume.path.is_dir() else [volume.path]
    for path in paths:
        if path.is_symlink():
            continue
        try:
            os.chown(path, -1, gid)
            mode = path.stat().st_mode
            extra = stat.S_IRGRP | (0 if volume.read_only else stat.S_IWGRP)
            if path.is_dir():
                extra |= stat.S_IXGRP | stat.S_ISGID
            os.chmod(path, mode | extra)
        except OSError as error:
            log.warning("fsGroup %d on %s: %s", gid, path, error)
