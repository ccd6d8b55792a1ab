"""A real node for the local cluster: the upstream kubelet with containerd, runc and the CNI plugins
(hack/node/build.sh), each node in namespaces and a cgroup subtree of its own
(``real_node_config``), so that starting one changes nothing on the host that stopping it doesn't
undo, and ``kubetune local down`` undoes what a crashed one left.

Two halves:

- ``python -m kubetune.local.real_node STATE_DIR`` is the node's supervised process. It joins the
  node's cgroup subtree, enters a new mount and network namespace, overlays the host directories
  the components hard-code, makes the veth to the host, starts containerd, imports the pause
  image, forwards the apiserver's loopback port into the namespace, starts the kubelet, and on
  SIGTERM stops both. Everything it started ends up in the cgroup subtree.
- ``RealNode`` (used by ``LocalCluster``) writes the node's configuration and certificates, starts
  and stops that process, imports images built by ``make images`` into the node's containerd,
  and removes the cgroup subtree (killing what is left in it) on the way down.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.local import real_node_config as config
from kubetune.local.certs import KeyPair, Pki, signed_cert
from kubetune.local.images import ImageStore
from kubetune.local.ports import free_port

#: The label that says which stored image (its manifest digest) a containerd image came from.
STORE_DIGEST_LABEL = "io.kubetune.store-digest"
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
#: The kubelet's view of the kernel settings it would otherwise set host-wide (it refuses to run
#: or rewrites them when they differ): files bound over /proc/sys inside the node's namespace.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


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


# -- cgroups ------------------------------------------------------------------------------------


def _controllers() -> list[Path]:
    """The mounted cgroup hierarchies (v1 controllers, and the unified one where mounted)."""
    try:
        return sorted(p for p in config.CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def join_cgroup(ident: str, pid: int) -> None:
    """Put ``pid`` into ``/kubetune-<id>/node`` of every hierarchy (created as needed)."""
    name = config.cgroup_name(ident)
    for hierarchy in _controllers():
        node = hierarchy / name / "node"
        node.mkdir(parents=True, exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            for leaf in (hierarchy / name, node):
                for key in ("cpuset.cpus", "cpuset.mems"):
                    if not (leaf / key).read_text().strip():
                        (leaf / key).write_text((hierarchy / key).read_text())
        with contextlib.suppress(OSError):
            (node / "cgroup.procs").write_text(f"{pid}\n")


def _subtree_pids(ident: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _controllers():
        top = hierarchy / config.cgroup_name(ident)
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def remove_cgroups(ident: str, timeout: float = 30.0) -> None:
    """SIGKILL every process left in the node's cgroup subtree, then remove the subtree from
    every hierarchy (deepest first)."""
    deadline = time.monotonic() + timeout
    while pids := _subtree_pids(ident):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} outlived SIGKILL in {ident}'s cgroups")
        time.sleep(0.1)
    for hierarchy in _controllers():
        top = hierarchy / config.cgroup_name(ident)
        if not top.is_dir():
            continue
        for directory in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            _rmdir_when_empty(directory, deadline)
        _rmdir_when_empty(top, deadline)


def _rmdir_when_empty(directory: Path, deadline: float) -> None:
    # A cgroup whose last process just died can be busy for a moment.
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the node process ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _setns(fd: int, flags: int) -> None:
    if _libc.setns(fd, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _run(*argv: str, **kwargs: object) -> None:
    subprocess.run(list(argv), check=True, **kwargs)  # type: ignore[call-overload]


def _in_host_netns(host_netns: int, *argv: str) -> None:
    _run("nsenter", f"--net=/proc/self/fd/{host_netns}", "--", *argv, pass_fds=(host_netns,))


def _mount_overlays(state: Path) -> None:
    """Make every mount private to this namespace, then overlay the hard-coded host paths with
    directories under the node's state: the host's files stay visible, writes land here."""
    _run("mount", "--make-rprivate", "/")
    for target in config.OVERLAID:
        base = state / "overlay" / target.strip("/").replace("/", "-")
        upper, work = base / "upper", base / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={target},upperdir={upper},workdir={work}"
        _run("mount", "-t", "overlay", "overlay", "-o", options, target)
    sysctl_dir = state / "sysctl"
    sysctl_dir.mkdir(exist_ok=True)
    for key, value in KUBELET_SYSCTLS.items():
        fake = sysctl_dir / key.replace("/", ".")
        fake.write_text(value + "\n")
        _run("mount", "--bind", "-o", "ro", str(fake), f"/proc/sys/{key}")


def _make_network(node: NodeState, host_netns: int) -> None:
    """Loopback, and a veth whose host side ``kt<id>`` holds the host's address of the node's
    /30 and whose other side is this namespace's ``eth0`` (the node's InternalIP)."""
    link = config.host_link_name(node.ident)
    host = f"{node.host_address}/{node.prefix_length}"
    own = f"{node.node_address}/{node.prefix_length}"
    _run("ip", "link", "set", "lo", "up")
    # The kubernetes Service's address is the node's own: _forward_apiserver listens there.
    _run("ip", "addr", "add", f"{config.KUBERNETES_SERVICE[0]}/32", "dev", "lo")
    _in_host_netns(
        host_netns,
        "ip",
        "link",
        "add",
        link,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        str(os.getpid()),
    )
    _in_host_netns(host_netns, "ip", "addr", "add", host, "dev", link)
    _in_host_netns(host_netns, "ip", "link", "set", link, "up")
    _run("ip", "addr", "add", own, "dev", "eth0")
    _run("ip", "link", "set", "eth0", "up")


def _forward_apiserver(port: int, host_netns: int) -> None:
    """Relay connections to the apiserver on the host's 127.0.0.1:``port`` from the node's
    namespace: from its 127.0.0.1:``port`` (the kubelet's kubeconfig is the host's) and from the
    ``kubernetes`` Service's address (in-cluster clients in pods; the apiserver's certificate
    names that address)."""
    for address in (("127.0.0.1", port), config.KUBERNETES_SERVICE):
        _relay_from(socket.create_server(address), port, host_netns)


def _relay_from(listener: socket.socket, port: int, host_netns: int) -> None:
    """Accept on ``listener`` (in the node's namespace), each connection relayed in a thread."""

    def relay(client: socket.socket) -> None:
        # A thread's network namespace is its own: this one connects from the host's.
        _setns(host_netns, CLONE_NEWNET)
        with (
            client,
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port)) as upstream,
        ):
            pump = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            pump.start()
            _pump(client, upstream)
            pump.join()

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _wait_for(check: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


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


def run_node(state_dir: Path) -> int:
    node = NodeState.load(state_dir)
    bin_dir = Path(node.bin_dir)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    join_cgroup(node.ident, os.getpid())
    host_netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    _unshare(CLONE_NEWNS | CLONE_NEWNET)
    _mount_overlays(state_dir)
    _make_network(node, host_netns)
    _forward_apiserver(node.apiserver_port, host_netns)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
    }
    children: list[subprocess.Popen[bytes]] = []

    def start(
        name: str, argv: Sequence[str], keep: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=keep
            )
        children.append(child)
        return child

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    root, root_lock = claim_containerd_root(Path(node.containerd_slots))
    (state_dir / "containerd.toml").write_text(
        config.containerd_config(bin_dir, root, state_dir / "cni")
    )
    try:
        containerd = start(
            "containerd",
            [str(bin_dir / "containerd"), "--config", str(state_dir / "containerd.toml")],
            keep=(root_lock,),
        )
        _wait_for(
            lambda: _socket_answers(config.CONTAINERD_SOCKET), "containerd's socket", containerd
        )
        _run(
            *ctr_argv(bin_dir, "images", "import", str(state_dir / "pause.tar")),
            env=env,
            stdout=subprocess.DEVNULL,
        )
        kubelet = start("kubelet", kubelet_argv(node, state_dir))
        proxy = start(
            "kube-proxy",
            [str(bin_dir / "kube-proxy"), f"--config={state_dir / 'kube-proxy.yaml'}", "--v=1"],
        )
        dns = start("coredns", [str(bin_dir / "coredns"), "-conf", str(state_dir / "Corefile")])
        policies = start("kube-router", kube_router_argv(node, state_dir))
        print(
            f"node {node.name}: containerd, kubelet, kube-proxy, CoreDNS, kube-router running",
            flush=True,
        )
        watched = {
            "containerd": containerd,
            "kubelet": kubelet,
            "kube-proxy": proxy,
            "coredns": dns,
            "kube-router": policies,
        }
        while not stopping.is_set():
            for what, child in watched.items():
                if child.poll() is None:
                    continue
                print(f"node {node.name}: {what} exited with {child.returncode}", flush=True)
                if what != "kube-router":
                    return 1
                # kube-router exits until the kubelet has registered the Node; it is
                # started again, as a DaemonSet's pod would be.
                watched[what] = start(what, kube_router_argv(node, state_dir))
            stopping.wait(1.0)
        return 0
    finally:
        for child in reversed(children):
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                child.kill()


def kube_router_argv(node: NodeState, state_dir: Path) -> list[str]:
    """kube-router as the node's NetworkPolicy enforcer only (iptables and ipsets in the node's
    network namespace): no routing, no service proxy (kube-proxy's), no CNI configuration."""
    return [
        str(Path(node.bin_dir) / "kube-router"),
        f"--kubeconfig={state_dir / 'kube-router.kubeconfig'}",
        f"--hostname-override={node.name}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--enable-cni=false",
        f"--service-cluster-ip-range={config.SERVICE_NETWORK}",
        "--health-port=0",
        "--v=1",
    ]


def kubelet_argv(node: NodeState, state_dir: Path) -> list[str]:
    argv = [
        str(Path(node.bin_dir) / "kubelet"),
        f"--config={state_dir / 'kubelet.yaml'}",
        f"--kubeconfig={state_dir / 'kubelet.kubeconfig'}",
        "--root-dir=/var/lib/kubelet",
        f"--node-ip={node.node_address}",
        f"--hostname-override={node.name}",
        "--v=1",
    ]
    if node.labels:
        argv.append("--node-labels=" + ",".join(node.labels))
    if node.taints:
        argv.append("--register-with-taints=" + ",".join(node.taints))
    return argv


# -- the host's side ----------------------------------------------------------------------------


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

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "kubetune.local.real_node", str(self.state_dir)]

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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m kubetune.local.real_node STATE_DIR", file=sys.stderr)
        return 2
    return run_node(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
