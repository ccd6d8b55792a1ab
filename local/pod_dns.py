"""Pod names as cluster DNS gives them, for pods that share the host's network namespace.

Each pod gets an address of its own on the loopback network (``127.a.b.c``, reported as
``status.podIP``), a host name (``spec.hostname`` or the pod's name, in a UTS namespace of its
own) and an ``/etc/hosts`` the node writes, as a kubelet does. A pod with ``spec.subdomain``
that names a headless Service of its namespace (whose selector matches it) is found as
``<hostname>.<subdomain>`` and the longer ``.<ns>.svc.cluster.local`` forms by every pod in the
same subdomain: the node keeps those hosts files current while the pods run (rewritten in place,
so the bind mount the container sees follows), which is what an Indexed Job's ranks need to
find rank 0.

The pods still share the host's ports: two pods that listen on the same port clash, as they
would with ``hostNetwork``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune.local.rest import JSON, ApiError, Rest, path_for

log = logging.getLogger(__name__)

CLUSTER_DOMAIN: Final = "cluster.local"
#: How often the node looks for new or gone peers of the pods it runs in a subdomain.
REFRESH_SECONDS: Final = 1.0
_HEADER: Final = (
    "# Kubernetes-managed hosts file (the kubetune local node).\n"
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
)


@dataclass(frozen=True)
class PodNetwork:
    """What the sandbox gives a pod's containers: its host name and its hosts file."""

    hostname: str
    hosts_file: Path


def pod_address(uid: str, taken: Iterable[str] = ()) -> str:
    """An address on the loopback network for the pod ``uid``: stable, never 127.0.0.x (the
    node's own), and not one of ``taken``."""
    used = set(taken)
    for salt in range(1024):
        digest = hashlib.sha256(f"{uid}/{salt}".encode()).digest()
        address = f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"
        if address not in used:
            return address
    raise RuntimeError("no free pod address")  # 16 million addresses: never in practice


def hostname_of(pod: JSON) -> str:
    """The pod's host name as a kubelet sets it: spec.hostname, else its name (63 at most)."""
    name = str(pod["spec"].get("hostname") or pod["metadata"]["name"])
    return name[:63].rstrip("-.")


def dns_names(hostname: str, subdomain: str, namespace: str) -> list[str]:
    """Every name of a pod in a subdomain, longest (the canonical one) first."""
    fqdn = f"{hostname}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}"
    return [fqdn, f"{hostname}.{subdomain}.{namespace}.svc", f"{hostname}.{subdomain}.{namespace}",
            f"{hostname}.{subdomain}"]  # fmt: skip


def _selects(service: JSON, pod: JSON) -> bool:
    selector: Mapping[str, str] = service.get("spec", {}).get("selector") or {}
    labels: Mapping[str, str] = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _headless(service: JSON) -> bool:
    return bool(service.get("spec", {}).get("clusterIP") == "None")


def _alive(pod: JSON) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and pod.get("status", {}).get(
        "phase"
    ) not in ("Succeeded", "Failed")


def hosts_file_text(
    pod: JSON, address: str, services: Sequence[JSON] = (), peers: Sequence[JSON] = ()
) -> str:
    """The pod's /etc/hosts: localhost, the pod itself, and (in a subdomain that a headless
    Service selecting the pod names) every other live pod of that subdomain with an address."""
    namespace = pod["metadata"]["namespace"]
    hostname = hostname_of(pod)
    subdomain = pod["spec"].get("subdomain")
    service = next(
        (
            s
            for s in services
            if s["metadata"]["name"] == subdomain and _headless(s) and _selects(s, pod)
        ),
        None,
    )
    lines = [_HEADER]
    if service is None:
        lines.append(f"{address}\t{hostname}\n")
        return "".join(lines)
    lines.append(f"{address}\t{' '.join([*dns_names(hostname, subdomain, namespace), hostname])}\n")
    others = sorted(
        (
            p
            for p in peers
            if p["metadata"].get("uid") != pod["metadata"].get("uid")
            and p["metadata"]["namespace"] == namespace
            and p["spec"].get("subdomain") == subdomain
            and p["spec"].get("hostname")
            and p.get("status", {}).get("podIP")
            and _alive(p)
            and _selects(service, p)
        ),
        key=lambda p: str(p["spec"]["hostname"]),
    )
    for peer in others:
        names = dns_names(hostname_of(peer), subdomain, namespace)
        lines.append(f"{peer['status']['podIP']}\t{' '.join(names)}\n")
    return "".join(lines)


def write_in_place(path: Path, text: str) -> bool:
    """Write ``text`` into the existing file ``path`` (same inode: a bind mount of it sees the
    change); False when it held ``text`` already."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, data)
        os.ftruncate(descriptor, len(data))
    finally:
        os.close(descriptor)
    path.chmod(0o644)
    return True


@dataclass
class _Tracked:
    pod: JSON
    address: str
    hosts_file: Path


class PodDns:
    """Keeps the hosts files of the node's pods in a subdomain current, while they run."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest
        self._pods: dict[str, _Tracked] = {}  # by uid
        self._lock = threading.Lock()

    def add(self, pod: JSON, address: str, hosts_file: Path) -> PodNetwork:
        """Write the pod's hosts file (with the peers known now) and follow it if it is in a
        subdomain; what its sandbox needs."""
        tracked = _Tracked(pod, address, hosts_file)
        hosts_file.parent.mkdir(parents=True, exist_ok=True)
        # The pod itself at once (the sandbox binds the file); its peers as they are found.
        write_in_place(hosts_file, hosts_file_text(pod, address))
        if pod["spec"].get("subdomain"):
            with self._lock:
                self._pods[pod["metadata"]["uid"]] = tracked
            self._refresh([tracked])
        return PodNetwork(hostname_of(pod), hosts_file)

    def remove(self, uid: str) -> None:
        with self._lock:
            self._pods.pop(uid, None)

    def refresh_until(self, stopping: threading.Event) -> None:
        while not stopping.wait(REFRESH_SECONDS):
            with self._lock:
                tracked = list(self._pods.values())
            if tracked:
                self._refresh(tracked)

    def _refresh(self, tracked: Sequence[_Tracked]) -> None:
        by_namespace: dict[str, list[_Tracked]] = {}
        for entry in tracked:
            by_namespace.setdefault(entry.pod["metadata"]["namespace"], []).append(entry)
        for namespace, entries in by_namespace.items():
            try:
                services = self.rest.get(path_for(namespace, "services"))["items"]
                pods = self.rest.get(path_for(namespace, "pods"))["items"]
            except (ApiError, OSError) as error:
                # The files keep what they had; the next round tries again.
                log.warning("pod names in %s: %s", namespace, error)
                continue
            for entry in entries:
                try:
                    write_in_place(
                        entry.hosts_file, hosts_file_text(entry.pod, entry.address, services, pods)
                    )
                except OSError as error:  # the pod's folder went with the pod
                    log.debug("hosts file of %s: %s", entry.pod["metadata"]["name"], error)
