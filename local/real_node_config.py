"""What a real node (kubelet + containerd + runc + CNI, docs/local-cluster.md "The real node") is
configured with: pure functions of its name, state directory, binaries and addresses.

Every host path the upstream components hard-code (``/run/containerd``, ``/var/lib/kubelet``,
``/var/lib/cni``, ``/var/log/containers``) lives inside the node's own mount namespace, on overlays
whose upper directories are under the node's state directory; its network (a veth to the host, the
pods' bridge, iptables chains, ``ip_forward``) lives in the node's own network namespace; its
processes and pods in one cgroup subtree, ``/kubetune-<id>``. Two nodes share none of them.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.local.components import SERVICE_CLUSTER_IP_RANGE

#: The pause image, built from the Kubernetes module's static pause.c (hack/node/build.sh).
PAUSE_IMAGE = "kubetune.local/pause:local"
#: Where containerd listens inside the node's mount namespace (its default, on the /run overlay).
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
#: Host directories the node overlays in its mount namespace: writes land in the node's state.
OVERLAID = ("/run", "/var/lib", "/var/log")
#: cgroup v1 controllers the node's processes and pods are accounted in.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The veth's host side gets ``.1`` of a /30 in this range, the node ``.2``.
LINK_NETWORK = ipaddress.IPv4Network("10.200.0.0/16")
#: The pods' addresses: each real node of a cluster gets its own /24 of it (``pod_network``), on
#: its own bridge inside its network namespace.
POD_NETWORKS = ipaddress.IPv4Network("10.88.0.0/16")
#: The Services' range (the apiserver's ``--service-cluster-ip-range``): the pods' only route
#: off their bridge, through the node.
SERVICE_NETWORK = ipaddress.IPv4Network(SERVICE_CLUSTER_IP_RANGE)
#: The ``kubernetes`` Service (KUBERNETES_SERVICE_HOST/PORT in every pod): the node holds this
#: address and relays its port 443 to the apiserver on the host's loopback.
KUBERNETES_SERVICE = (str(SERVICE_NETWORK.network_address + 1), 443)
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class RealNodeSpec:
    """One real node as ``up`` asked for it."""

    name: str
    gpus: int = 0
    labels: tuple[str, ...] = ()  # key=value
    taints: tuple[str, ...] = ()  # key[=value]:Effect


def containerd_slots() -> Path:
    """Where real nodes keep containerd's roots (images, snapshots) between clusters, one root
    per running node (``real_node.claim_containerd_root``): in kubetune's cache, so a multi-GB
    image is imported once per root, not once per cluster."""
    cache = os.environ.get("KUBETUNE_CACHE_DIR") or str(Path.home() / ".cache" / "kubetune")
    return Path(cache) / "containerd-roots"


def node_id(home: Path, name: str) -> str:
    """A short id of node ``name`` of the cluster in ``home``: names its cgroups and host link."""
    return hashlib.sha256(f"{home.resolve()}\0{name}".encode()).hexdigest()[:10]


def host_link_name(ident: str) -> str:
    """The host side of the node's veth (at most 15 characters)."""
    return f"kt{ident}"


def cgroup_name(ident: str) -> str:
    """The node's cgroup subtree (the kubelet's ``cgroupRoot``), in every controller."""
    return f"kubetune-{ident}"


def pod_network(ident: str, taken: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A /24 of ``POD_NETWORKS`` for the node's pods, derived from its id and outside ``taken``
    (the other real nodes' of the cluster)."""
    subnets = list(POD_NETWORKS.subnets(new_prefix=24))
    start = int(ident, 16) % len(subnets)
    for offset in range(len(subnets)):
        candidate = subnets[(start + offset) % len(subnets)]
        if candidate not in taken:
            return candidate
    raise RuntimeError(f"no free /24 left in {POD_NETWORKS}")


def cluster_dns(pods: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """Cluster DNS: the node's CoreDNS answers on the pods' gateway, the node's side of their
    bridge (an address outside the Services' range, so no Service can be given it)."""
    return pods.network_address + 1


def link_addresses(ident: str, taken: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A /30 of ``LINK_NETWORK`` for the node's veth, derived from its id and outside ``taken``
    (the host's routes): ``.1`` is the host's side, ``.2`` the node's address (its InternalIP)."""
    subnets = list(LINK_NETWORK.subnets(new_prefix=30))
    start = int(ident, 16) % len(subnets)
    for offset in range(len(subnets)):
        candidate = subnets[(start + offset) % len(subnets)]
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise RuntimeError(f"no free /30 left in {LINK_NETWORK}")


def containerd_config(bin_dir: Path, root: Path, cni_conf_dir: Path) -> str:
    """containerd's configuration (version 3): CRI with runc (cgroupfs), the locally built
    pause image, CNI from ``bin_dir/cni``; the root on the node's state directory."""
    runc = bin_dir / "runc"
    return f"""version = 3
root = {json.dumps(str(root))}
state = "/run/containerd"

[grpc]
  address = {json.dumps(CONTAINERD_SOCKET)}

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = {json.dumps(PAUSE_IMAGE)}

[plugins."io.containerd.cri.v1.runtime"]
  # CAP_SYS_RESOURCE can be missing from the bounding set (a container host): without this runc
  # fails to lower a container's oom_score_adj ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = {json.dumps(str(runc))}
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [{json.dumps(str(bin_dir / "cni"))}]
    conf_dir = {json.dumps(str(cni_conf_dir))}
    max_conf_num = 1
"""


def cni_conflist(pods: ipaddress.IPv4Network) -> dict[str, Any]:
    """The pods' network inside the node's network namespace: a bridge with the node's side as
    the gateway and host-local addresses. No masquerading and no default route: a pod reaches
    other pods, and the Services' range through the node (where the ``kubernetes`` Service's
    address is the node's own), nothing of the host's networks."""
    gateway = cluster_dns(pods)
    return {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(pods), "gateway": str(gateway)}]],
                    "routes": [{"dst": str(SERVICE_NETWORK)}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    *,
    node_ip: str,
    port: int,
    healthz_port: int,
    ident: str,
    ca_file: Path,
    serving_cert: Path,
    serving_key: Path,
    pod_logs: Path,
    pods: ipaddress.IPv4Network,
) -> dict[str, Any]:
    """The KubeletConfiguration: cgroupfs on cgroup v1 under the node's own ``cgroupRoot``,
    serving on the node's address with a certificate from the cluster's CA, clients
    authenticated by that CA; eviction thresholds low enough for a shared development machine."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cgroup_name(ident)}",
        "failCgroupV1": False,
        "failSwapOn": False,
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca_file)},
        },
        # The apiserver (its kubelet client certificate, from the same CA) is the only client.
        "authorization": {"mode": "AlwaysAllow"},
        "podLogsDir": str(pod_logs),
        # Cluster DNS is the node's CoreDNS, on the pods' gateway (coredns_corefile).
        "clusterDNS": [str(cluster_dns(pods))],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "maxPods": 110,
        "registerNode": True,
        "nodeStatusReportFrequency": "10s",
    }


def kube_proxy_config(name: str, kubeconfig: Path) -> dict[str, Any]:
    """kube-proxy in iptables mode in the node's network namespace. Every Service connection is
    masqueraded (pods share one bridge, and the node has no br_netfilter to see replies that
    go pod to pod); conntrack's host-wide limits are left alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": name,
        "mode": "iptables",
        "clusterCIDR": str(POD_NETWORKS),
        "iptables": {"masqueradeAll": True},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        # In the node's network namespace: these ports are its own.
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
    }


def coredns_corefile(kubeconfig: Path) -> str:
    """CoreDNS as the node's cluster DNS: Services and pods of ``cluster.local`` from the
    apiserver; nothing is forwarded (the host's resolvers are none of the cluster's business)."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 5
    }}
    cache 5
}}
"""


def node_kubeconfig(server: str, ca_file: Path, cert: Path, key: Path) -> dict[str, Any]:
    """The kubelet's kubeconfig: its own client certificate (``system:node:<name>``)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [
            {"name": "node", "user": {"client-certificate": str(cert), "client-key": str(key)}}
        ],
        "contexts": [{"name": "node", "context": {"cluster": "local", "user": "node"}}],
        "current-context": "node",
    }


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    _tar_member(tar, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}", len(data)


def pause_image_archive(pause: bytes, name: str = PAUSE_IMAGE) -> bytes:
    """An OCI image archive (what ``ctr images import`` reads) of one layer holding the static
    ``pause`` binary, named ``name``; byte-identical for the same binary."""
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        _tar_member(layer, "pause", pause, mode=0o755)
    layer_bytes = layer_buffer.getvalue()
    layer_digest = f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        layer_ref = _blob(tar, layer_bytes)
        config_ref = _blob(tar, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_ref[0],
                "size": config_ref[1],
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_ref[0],
                    "size": layer_ref[1],
                }
            ],
        }
        manifest_ref = _blob(tar, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_ref[0],
                    "size": manifest_ref[1],
                    "annotations": {"io.containerd.image.name": name},
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
        _tar_member(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    return out.getvalue()
