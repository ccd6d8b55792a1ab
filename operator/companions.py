"""The companions of a FineTuneJob's Job: the namespace's trainer NetworkPolicy (one, shared), a
group's own policy between its pods and its headless Service. Pure: data in, manifests out."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any, Final

from kubetune.api.contract import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, RENDEZVOUS_PORT
from kubetune.operator.names import ChildNames, group_selector
from kubetune.operator.objects import Manifest, Obj
from kubetune.operator.settings import OperatorSettings


def headless_service(name: str, names: ChildNames, meta: Any, uid: str | None = None) -> Manifest:
    """The Service whose name is the group's pods' subdomain: ``<job>-<index>.<service>``
    resolves to that pod, ready or not (ranks must find rank 0 before any of them is Ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(names.service),
        "spec": {
            "clusterIP": "None",
            "selector": group_selector(name, uid),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


#: The namespace's one trainer NetworkPolicy, shared by every FineTuneJob there.
TRAINERS_POLICY: Final = "kubetune-trainers"
#: The pods it selects: every pod kubetune runs for a FineTuneJob (trainers and validators; a
#: pod template can't change these labels: kubetune's win).
TRAINER_PODS: Final = {"app.kubernetes.io/name": "kubetune", MANAGED_BY_LABEL: MANAGED_BY}


def shared(manifest: Obj) -> bool:
    """Whether ``manifest`` is a namespace's shared companion (no job owns it)."""
    return manifest.get("kind") == "NetworkPolicy" and (
        manifest.get("metadata", {}).get("name") == TRAINERS_POLICY
    )


def trainers_policy(namespace: str, settings: OperatorSettings) -> Manifest:
    """The namespace's trainer NetworkPolicy: every pod kubetune runs there gets no ingress, and
    egress to the cluster's DNS, the operator's progress port and the allowed CIDRs, less what
    lies inside them of the excepted addresses (private ranges, the cluster's pod and service
    CIDRs, metadata). One object per namespace, not one per job (policy evaluation in a network
    plugin grows with the policies that select a pod); no job owns it, so it outlives each.

    DNS goes only to the cluster's DNS pods (and the DNS CIDRs the settings add), never port 53
    anywhere: an open port 53 is a way out to any host. Pods of one namespace never reach each
    other through it: a group's pods get their own policy (``group_policy``).
    """
    dns_ports = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    dns_peers: list[Manifest] = [
        {
            "namespaceSelector": {"matchLabels": dict(settings.trainer_dns_namespace_selector)},
            "podSelector": {"matchLabels": dict(settings.trainer_dns_pod_selector)},
        }
    ]
    dns_peers += [{"ipBlock": block} for block in egress_blocks(settings.trainer_dns_cidrs, [])]
    egress: list[Manifest] = [{"to": dns_peers, "ports": dns_ports}]
    if settings.progress_url and settings.progress_peer_pod_selector and settings.progress_port:
        # Progress goes to the operator's pods, on the progress port and nothing else.
        operator: Manifest = {
            "podSelector": {"matchLabels": dict(settings.progress_peer_pod_selector)}
        }
        if settings.progress_peer_namespace_selector:
            operator["namespaceSelector"] = {
                "matchLabels": dict(settings.progress_peer_namespace_selector)
            }
        egress.append(
            {"to": [operator], "ports": [{"port": settings.progress_port, "protocol": "TCP"}]}
        )
    if settings.trainer_apiserver_cidrs:
        # Progress goes to the API server, whose endpoints often lie in an excepted range.
        api_peers = egress_blocks(settings.trainer_apiserver_cidrs, [])
        api_ports = [{"port": port, "protocol": "TCP"} for port in settings.trainer_apiserver_ports]
        egress.append({"to": [{"ipBlock": block} for block in api_peers], "ports": api_ports})
    excepted = [*settings.trainer_egress_except, *settings.trainer_cluster_cidrs]
    blocks = egress_blocks(settings.trainer_egress_cidrs, excepted)
    if blocks:
        egress.append({"to": [{"ipBlock": block} for block in blocks]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": TRAINERS_POLICY,
            "namespace": namespace,
            "labels": {**TRAINER_PODS, COMPONENT_LABEL: "trainer-network"},
        },
        "spec": {
            "podSelector": {"matchLabels": dict(TRAINER_PODS)},
            "policyTypes": ["Ingress", "Egress"],
            "egress": egress,
        },
    }


def group_policy(name: str, names: ChildNames, meta: Any, uid: str | None = None) -> Manifest:
    """A multi-pod group's pods reach each other, and only each other: the rendezvous (rank 0's
    port) and the collectives, whose gloo and NCCL sockets take ephemeral ports on each side, so
    the rule names the pods (by the FineTuneJob's uid), not ports. Added to what the namespace's
    ``trainers_policy`` allows them."""
    peers: list[Manifest] = [{"podSelector": {"matchLabels": group_selector(name, uid)}}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(names.network_policy),
        "spec": {
            "podSelector": {"matchLabels": group_selector(name, uid)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": peers}],
            "egress": [{"to": peers}],
        },
    }


def egress_blocks(cidrs: list[str], excepted: list[str]) -> list[Manifest]:
    """An ipBlock per CIDR, with the excepted networks that lie strictly inside it.

    The apiserver refuses an ``except`` that isn't a strict subset of its ``cidr``, and one such
    entry would fail every job: an excepted range that holds the whole CIDR (a platform that
    allows its pods' CIDR while the private ranges are excepted) leaves the CIDR as it is, the
    platform's explicit choice; one of the other address family or outside it is left out.
    (Worked out once per list of settings, copied for each manifest.)
    """
    return [
        {"cidr": cidr, "except": list(inside)} if inside else {"cidr": cidr}
        for cidr, inside in _blocks(tuple(cidrs), tuple(excepted))
    ]


@functools.lru_cache(maxsize=64)
def _blocks(
    cidrs: tuple[str, ...], excepted: tuple[str, ...]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    blocks = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr)
        inside: list[str] = []
        for entry in excepted:
            other = ipaddress.ip_network(entry)
            if _strictly_inside(other, network) and str(other) not in inside:
                inside.append(str(other))
        blocks.append((str(network), tuple(inside)))
    return tuple(blocks)


def _strictly_inside(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.prefixlen > outer.prefixlen and inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.prefixlen > outer.prefixlen and inner.subnet_of(outer)
    return False


#: What of each companion kubetune renders and the pod relies on: compared with a companion that
#: existed before kubetune created it (whoever made it, with the job's uid as its owner). Keys
#: compared whole: what is there and kubetune doesn't render (extra data, Secrets of a service
#: account) counts as a difference too.
_COMPANION_CONTENT: Final = {
    "ConfigMap": ("data", "binaryData"),
    "ServiceAccount": ("automountServiceAccountToken", "secrets", "imagePullSecrets"),
    "Role": ("rules",),
    "RoleBinding": ("roleRef", "subjects"),
}
#: Kinds whose ``spec`` the apiserver defaults: kubetune's must be contained in the existing one.
_SPEC_KINDS: Final = frozenset({"NetworkPolicy", "Service"})


def companion_differs(rendered: Obj, existing: Obj) -> bool:
    """Whether ``existing`` (a companion found in place of ``rendered``) carries other content
    than kubetune rendered: then the rendered content must be written over it."""
    kind = str(rendered.get("kind"))
    if kind in _SPEC_KINDS:
        return not _contains(existing.get("spec"), rendered.get("spec"))
    return any(rendered.get(key) != existing.get(key) for key in _COMPANION_CONTENT.get(kind, ()))


def _contains(have: Any, want: Any) -> bool:
    """``want`` within ``have``: maps may have more keys (the apiserver's defaults), lists match
    item by item and in length, other values are equal."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            key in have and _contains(have[key], value) for key, value in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(_contains(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(have == want)
