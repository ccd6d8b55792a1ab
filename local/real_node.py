"""A real node for the local cluster: the upstream kubelet with containerd, runc and the CNI plugins
(hack/node/build.sh), each node in namespaces and a cgroup subtree of its own
(``real_node_config``), so that starting one changes nothing on the host that stopping it doesn't
undo, and ``kubetune local down`` undoes what a crashed one left.

Two halves:

- ``python -m kubetune.local.node_process STATE_DIR`` is the node's supervised process
  (``node_process``): it joins the node's cgroup subtree (``node_cgroups``), enters a new mount
  and network namespace (``node_namespaces``), starts containerd, imports the pause image, starts
  the kubelet and the node's other components, and on SIGTERM stops them.
- ``RealNode`` (here, used by ``LocalCluster``) writes the node's configuration and certificates
  (``NodeState``), starts and stops that process, imports images built by ``make images`` into
  the node's containerd, and removes the cgroup subtree (killing what is left in it) on the way
  down. The node's containerd root is one of the slots ``claim_containerd_root`` hands out.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.local import real_node_config as config
from kubetune.local.certs import KeyPair, Pki, signed_cert
from kubetune.local.images import ImageStore
from kubetune.local.node_cgroups import remove_cgroups
from kubetune.local.ports import free_port

#: The label that says which stored image (its manifest digest) a containerd image came from.
STORE_DIGEST_LABEL = "io.kubetune.store-digest"


@dataclass
class NodeState:
    """What the node process needs, written by ``RealNode.prepare`` as ``node.json``."""

    name: str
    ident: str
    state_dir: str
    bin_dir: str
    apiserver_port: int
    host_address: str  # the host's side of the veth
    node_address: str  # the node's InternalIP
    prefix_length: int
    pod_network: str
    labels: list[str]
    taints: list[str]
    # Where containerd's roots are kept between clusters (``claim_containerd_root``).
    containerd_slots: str = ""

    @classmethod
    def load(cls, state_dir: Path) -> NodeState:
        return cls(**json.loads((state_dir / "node.json").read_text()))

    def save(self) -> None:
        (Path(self.state_dir) / "node.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def claim_containerd_root(slots: Path) -> tuple[Path, int]:
    """The first containerd root under ``slots`` that no running node holds, and the descriptor
    of its lock (``slot-<n>.lock``, flocked): the node's containerd inherits it, so the root is
    one node's for as long as any of its processes lives, and the next node to start, of any
    cluster, finds the images it holds."""
    slots.mkdir(parents=True, exist_ok=True)
    for index in itertools.count():
        lock = os.open(slots / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            continue
        return slots / f"slot-{index}", lock
    raise AssertionError("unreachable")


def ctr_argv(bin_dir: Path, *args: str) -> list[str]:
    return [
        str(bin_dir / "ctr"),
        "--address",
        config.CONTAINERD_SOCKET,
        "--namespace",
        "k8s.io",
        *args,
    ]


def _host_routes() -> set[ipaddress.IPv4Network]:
    result = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True, check=True)
    routes = set()
    for route in json.loads(result.stdout):
        dst = route.get("dst", "")
        if dst and dst != "default":
            routes.add(ipaddress.IPv4Network(dst, strict=False))
    return routes


class RealNode:
    """One real node of the cluster in ``home``; its state is ``home/real-nodes/<name>``."""

    def __init__(self, home: Path, name: str) -> None:
        self.home = home
        self.name = name
        self.ident = config.node_id(home, name)
        self.state_dir = home / "real-nodes" / name

    @staticmethod
    def all_in(home: Path) -> Iterator[RealNode]:
        for directory in sorted((home / "real-nodes").glob("*")):
            if directory.is_dir():
                yield RealNode(home, directory.name)

    @property
    def process_name(self) -> str:
        return f"kubelet-{self.name}"

    def prepare(
        self,
        spec: config.RealNodeSpec,
        *,
        bin_dir: Path,
        pki: Pki,
        apiserver_port: int,
        admin_kubeconfig: Path,
    ) -> NodeState:
        """Write the node's configuration, certificates and pause image under its state."""
        state = self.state_dir
        for directory in (state, state / "cni", state / "pod-logs"):
            directory.mkdir(parents=True, exist_ok=True)
        link = config.link_addresses(self.ident, _host_routes())
        host_address, node_address = (str(a) for a in list(link.hosts())[:2])
        others = {
            ipaddress.IPv4Network(NodeState.load(other.state_dir).pod_network)
            for other in RealNode.all_in(self.home)
            if other.name != self.name and (other.state_dir / "node.json").exists()
        }
        pods = config.pod_network(self.ident, others)
        self._write_components_config(state, pki, node_address, pods, apiserver_port)
        # CoreDNS reads Services, EndpointSlices, pods and namespaces cluster-wide, kube-router
        # pods, namespaces and NetworkPolicies: as admin.
        (state / "Corefile").write_text(config.coredns_corefile(admin_kubeconfig))
        (state / "kube-router.kubeconfig").write_text(admin_kubeconfig.read_text())
        (state / "pause.tar").write_bytes(
            config.pause_image_archive((bin_dir / "pause").read_bytes())
        )
        node = NodeState(
            name=self.name,
            ident=self.ident,
            state_dir=str(state),
            bin_dir=str(bin_dir),
            apiserver_port=apiserver_port,
            host_address=host_address,
            node_address=node_address,
            prefix_length=link.prefixlen,
            pod_network=str(pods),
            labels=list(spec.labels),
            taints=list(spec.taints),
            containerd_slots=str(config.containerd_slots()),
        )
        node.save()
        return node

    def _write_components_config(
        self,
        state: Path,
        pki: Pki,
        node_address: str,
        pods: ipaddress.IPv4Network,
        apiserver_port: int,
    ) -> None:
        """The kubelet's and kube-proxy's certificates, configurations and kubeconfigs, and the
        CNI configuration, under ``state``."""
        ca = pki.ca.cert
        client = KeyPair.named(state, "kubelet-client")
        serving = KeyPair.named(state, "kubelet-serving")
        signed_cert(
            pki.ca, client, f"/O=system:nodes/CN=system:node:{self.name}", usage="clientAuth"
        )
        signed_cert(
            pki.ca,
            serving,
            f"/CN={self.name}",
            usage="serverAuth",
            alt_names=[f"IP:{node_address}", f"DNS:{self.name}"],
        )
        (state / "cni" / "10-kubetune.conflist").write_text(
            json.dumps(config.cni_conflist(pods), indent=2) + "\n"
        )
        kubelet = config.kubelet_config(
            node_ip=node_address,
            port=free_port(),
            healthz_port=free_port(),
            ident=self.ident,
            ca_file=ca,
            serving_cert=serving.cert,
            serving_key=serving.key,
            pod_logs=state / "pod-logs",
            pods=pods,
        )
        (state / "kubelet.yaml").write_text(json.dumps(kubelet, indent=2) + "\n")
        kubeconfig = config.node_kubeconfig(
            f"https://127.0.0.1:{apiserver_port}", ca, client.cert, client.key
        )
        (state / "kubelet.kubeconfig").write_text(json.dumps(kubeconfig, indent=2) + "\n")
        # kube-proxy as the user the default RBAC binds to system:node-proxier.
        proxy = KeyPair.named(state, "kube-proxy-client")
        signed_cert(pki.ca, proxy, "/CN=system:kube-proxy", usage="clientAuth")
        proxy_kubeconfig = config.node_kubeconfig(
            f"https://127.0.0.1:{apiserver_port}", ca, proxy.cert, proxy.key
        )
        (state / "kube-proxy.kubeconfig").write_text(json.dumps(proxy_kubeconfig, indent=2) + "\n")
        proxy_config = config.kube_proxy_config(self.name, state / "kube-proxy.kubeconfig")
        (state / "kube-proxy.yaml").write_text(json.dumps(proxy_config, indent=2) + "\n")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "kubetune.local.node_process", str(self.state_dir)]

    def clean_up(self) -> None:
        """Kill what is left in the node's cgroups and remove them; the node's namespaces (its
        mounts, veth, bridge and iptables chains) go with the last of its processes."""
        remove_cgroups(self.ident)

    def containerd_root(self) -> Path:
        """The containerd root (a slot of ``containerd_slots``) the node runs, or last ran, on."""
        config_text = (self.state_dir / "containerd.toml").read_text()
        line = next(x for x in config_text.splitlines() if x.startswith("root = "))
        return Path(json.loads(line.removeprefix("root = ")))

    def ctr(self, pid: int, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr`` in the node's namespaces (the node process is ``pid``)."""
        node = NodeState.load(self.state_dir)
        argv = ["nsenter", "-t", str(pid), "-m", "-n", "--", *ctr_argv(Path(node.bin_dir), *args)]
        result: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
            argv, check=True, capture_output=True, **kwargs
        )
        return result

    def import_images(self, pid: int, references: Sequence[str], store: Path) -> None:
        """Put images that ``make images`` stored into the node's containerd, unless it holds
        them already (the same manifest digest, a label on the image): pushed from buildah's
        storage as an OCI archive, then ``ctr images import``ed under the name the kubelet asks
        for (``docker.io/<reference>``)."""
        for reference in references:
            image = ImageStore(store).find(reference)
            if image is None:
                raise RuntimeError(
                    f"{reference} is not in the image store {store}: run make images"
                )
            name = containerd_name(image.reference)
            listed = self.ctr(pid, "images", "ls", f"name=={name}").stdout.decode()
            if f"{STORE_DIGEST_LABEL}={image.digest}" not in listed:
                self._import(pid, image.reference, image.digest, name, store)
            self._name_by_digest(pid, name)

    def _import(self, pid: int, reference: str, digest: str, name: str, store: Path) -> None:
        """Push stored image ``reference`` from buildah's storage as an OCI archive, import it
        as ``name`` and label it with the stored ``digest``."""
        archive = self.state_dir / "import.tar"
        buildah_root = store.parent / "buildah"
        subprocess.run(
            [
                "buildah",
                "--root",
                str(buildah_root / "root"),
                "--runroot",
                str(buildah_root / "run"),
                "--storage-driver",
                "overlay",
                "--storage-opt",
                "overlay.skip_mount_home=true",
                "push",
                "--quiet",
                reference,
                f"oci-archive:{archive}:{name}",
            ],
            check=True,
            capture_output=True,
        )
        try:
            # The archive lies on the host's disk, which the node's mount namespace sees.
            self.ctr(pid, "images", "import", "--base-name", name.rsplit(":", 1)[0], str(archive))
        finally:
            archive.unlink(missing_ok=True)
        self.ctr(pid, "images", "label", name, f"{STORE_DIGEST_LABEL}={digest}")

    def _name_by_digest(self, pid: int, name: str) -> None:
        """Also name the image by its manifest's digest (``<repository>@sha256:...``), as a
        pulled image is: the kubelet then reports that as the container's ``imageID``."""
        listed = self.ctr(pid, "images", "ls", f"name=={name}").stdout.decode().splitlines()
        digest = listed[1].split()[2]
        repository = name.rsplit(":", 1)[0]
        self.ctr(pid, "images", "tag", "--force", name, f"{repository}@{digest}")


def containerd_name(reference: str) -> str:
    """The name the kubelet asks containerd for: Docker's normalization of ``reference``."""
    first = reference.split("/", 1)[0]
    if "/" not in reference:
        reference = f"library/{reference}"
    elif "." in first or ":" in first or first == "localhost":
        return reference
    return f"docker.io/{reference}"
