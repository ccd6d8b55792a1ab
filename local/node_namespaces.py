"""A real node's namespaces, entered by its process (``node_process``): a mount namespace whose
overlays hold the host paths the components hard-code, with the kubelet's kernel settings bound
over /proc/sys; a network namespace with a veth to the host; and relays that carry the
apiserver's loopback port into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from pathlib import Path

from kubetune.local import real_node_config as config
from kubetune.local.real_node import NodeState

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


_libc = ctypes.CDLL(None, use_errno=True)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _setns(fd: int, flags: int) -> None:
    if _libc.setns(fd, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def run(*argv: str, **kwargs: object) -> None:
    subprocess.run(list(argv), check=True, **kwargs)  # type: ignore[call-overload]


def _in_host_netns(host_netns: int, *argv: str) -> None:
    run("nsenter", f"--net=/proc/self/fd/{host_netns}", "--", *argv, pass_fds=(host_netns,))


def mount_overlays(state: Path) -> None:
    """Make every mount private to this namespace, then overlay the hard-coded host paths with
    directories under the node's state: the host's files stay visible, writes land here."""
    run("mount", "--make-rprivate", "/")
    for target in config.OVERLAID:
        base = state / "overlay" / target.strip("/").replace("/", "-")
        upper, work = base / "upper", base / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={target},upperdir={upper},workdir={work}"
        run("mount", "-t", "overlay", "overlay", "-o", options, target)
    sysctl_dir = state / "sysctl"
    sysctl_dir.mkdir(exist_ok=True)
    for key, value in KUBELET_SYSCTLS.items():
        fake = sysctl_dir / key.replace("/", ".")
        fake.write_text(value + "\n")
        run("mount", "--bind", "-o", "ro", str(fake), f"/proc/sys/{key}")


def make_network(node: NodeState, host_netns: int) -> None:
    """Loopback, and a veth whose host side ``kt<id>`` holds the host's address of the node's
    /30 and whose other side is this namespace's ``eth0`` (the node's InternalIP)."""
    link = config.host_link_name(node.ident)
    host = f"{node.host_address}/{node.prefix_length}"
    own = f"{node.node_address}/{node.prefix_length}"
    run("ip", "link", "set", "lo", "up")
    # The kubernetes Service's address is the node's own: forward_apiserver listens there.
    run("ip", "addr", "add", f"{config.KUBERNETES_SERVICE[0]}/32", "dev", "lo")
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
    run("ip", "addr", "add", own, "dev", "eth0")
    run("ip", "link", "set", "eth0", "up")


def forward_apiserver(port: int, host_netns: int) -> None:
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
