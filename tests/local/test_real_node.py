"""Pods on a real node: the upstream kubelet with containerd and runc (``real_node``), where what
kubetune promises about containers is enforced, not just accepted: the chart's security context
(non-root uid, read-only root filesystem, no capabilities, no new privileges, the runtime's
seccomp profile) as the pod's own process sees it, and memory limits (``OOMKilled``)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.local.controlplane import NodeOptions
from kubetune.local.real_node import RealNode
from kubetune.local.real_node_config import (
    PAUSE_IMAGE,
    POD_NETWORKS,
    cgroup_name,
    host_link_name,
)
from kubetune_devtools.installs import project_version
from kubetune_devtools.pytest_plugin import (
    ECHO_SERVER,
    REAL_NODE_ONLY,
    ClusterHandle,
    Kubectl,
    apply,
    dedicated_to,
    get_json,
    placed_on,
    pod_ip_once_running,
    pod_manifest,
    python_pod_on_real_node,
    run_to_end,
    wait_for,
)

pytestmark = pytest.mark.integration

OPERATOR_IMAGE = f"kubetune/operator:{project_version()}"
CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "values.yaml"

# Run by the pod's own process: what it is, as the kernel sees it, written as its termination
# message (the kubelet reads it from the container, so the test needs no logs).
SELF_REPORT = """
import errno, json, os
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
try:
    open("/written-by-the-pod", "w").close()
    root_write = "ok"
except OSError as error:
    root_write = errno.errorcode[error.errno]
open("/tmp/scratch", "w").write("fine")
report = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "CapEff": status["CapEff"].strip(), "CapPrm": status["CapPrm"].strip(),
    "NoNewPrivs": status["NoNewPrivs"].strip(), "Seccomp": status["Seccomp"].strip(),
    "root_write": root_write,
}
open("/dev/termination-log", "w").write(json.dumps(report))
"""

# Resolves the Service's name (retrying until CoreDNS has it), connects, writes what it got.
ECHO_CLIENT = """
import json, socket, sys, time
deadline = time.monotonic() + 60
while True:
    try:
        address = socket.gethostbyname(sys.argv[1])
        with socket.create_connection((sys.argv[1], 80), 5) as connection:
            answer = connection.recv(100).decode()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
open("/dev/termination-log", "w").write(json.dumps({"address": address, "answer": answer}))
"""

# Allocates (and touches) memory well past a 64 MiB limit.
EAT_MEMORY = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))\n"


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    (status,) = pod["status"]["containerStatuses"]
    return dict(status["state"]["terminated"])


def test_the_real_node_is_an_upstream_kubelet_with_containerd_and_a_gpu(
    kubectl: Kubectl, real_node: str
) -> None:
    node = get_json(kubectl, "node", real_node)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"].startswith("v1.34.")
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "1"
    assert node["metadata"]["labels"]["kubetune.io/real-node"] == "only"


def test_a_pod_with_the_charts_security_context_runs_non_root_read_only_without_capabilities(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    pod = python_pod_on_real_node(
        "self-report",
        SELF_REPORT,
        container={
            "securityContext": values["securityContext"],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
        securityContext=values["podSecurityContext"],
        volumes=[{"name": "tmp", "emptyDir": {}}],
    )

    ended = run_to_end(kubectl, namespace, pod, 120)

    state = terminated(ended)
    assert ended["status"]["phase"] == "Succeeded", state
    report = json.loads(state["message"])
    uid = values["podSecurityContext"]["runAsUser"]
    assert (report["uid"], report["gid"]) == (uid, values["podSecurityContext"]["runAsGroup"])
    assert values["podSecurityContext"]["fsGroup"] in report["groups"]
    assert uid != 0
    assert report["CapEff"] == report["CapPrm"] == "0000000000000000"
    assert report["NoNewPrivs"] == "1"
    assert report["Seccomp"] == "2"  # a filter: the runtime's default profile
    assert report["root_write"] == "EROFS"


def test_a_container_over_its_memory_limit_ends_oom_killed(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    pod = python_pod_on_real_node(
        "eats-memory",
        EAT_MEMORY,
        container={"resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}},
    )

    ended = run_to_end(kubectl, namespace, pod, 120)

    assert ended["status"]["phase"] == "Failed"
    state = terminated(ended)
    assert (state["reason"], state["exitCode"]) == ("OOMKilled", 137)


# In-cluster configuration as every client library does it: KUBERNETES_SERVICE_HOST/PORT and the
# projected service-account token.
WHO_AM_I = """
import json
from kubernetes import client, config
config.load_incluster_config()
review = client.AuthenticationV1Api().create_self_subject_review({})
open("/dev/termination-log", "w").write(json.dumps({"user": review.status.user_info.username}))
"""


def test_a_pod_reaches_the_apiserver_through_the_kubernetes_service_with_its_token(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    pod = python_pod_on_real_node("who-am-i", WHO_AM_I)

    ended = run_to_end(kubectl, namespace, pod, 120)

    state = terminated(ended)
    assert ended["status"]["phase"] == "Succeeded", state
    assert json.loads(state["message"]) == {"user": f"system:serviceaccount:{namespace}:default"}


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped by its parent, doesn't)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def host_links() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout


def root_free(root: Path) -> bool:
    """No node holds the containerd root ``root`` (its slot's lock can be taken)."""
    lock = os.open(root.with_name(f"{root.name}.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(lock)
    return True


def test_a_crashed_real_node_leaves_nothing_on_the_host_once_stopped(
    local_cluster: ClusterHandle, kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    """What ``kubetune local down`` does for each real node of its cluster, after the node's
    supervisor died without cleaning up (SIGKILL): its kubelet, containerd, shims and pods are
    killed, and its cgroups, host link and mounts are gone. Two nodes running at once keep their
    images in two containerd roots; the crashed node's is free for the next node once it is
    stopped."""
    local = local_cluster.local()
    name = "kubetune-test-crash"
    only = f"{REAL_NODE_ONLY}-crash"
    local.start_real_node(NodeOptions(name=name, **dedicated_to(only)))
    try:
        pause = pod_manifest(
            "sleeps",
            {"name": "main", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"},
            **placed_on(only),
        )
        apply(kubectl, namespace, pause)
        wait_for(
            lambda: (
                get_json(kubectl, "pod", "sleeps", "-n", namespace)["status"].get("phase")
                == "Running"
            ),
            120,
            "the pod to run",
        )
        real = RealNode(local.layout.home, name)
        cgroups = sorted(Path("/sys/fs/cgroup").glob(f"*/{cgroup_name(real.ident)}"))
        assert cgroups
        pids = {
            int(p) for c in cgroups for f in c.rglob("cgroup.procs") for p in f.read_text().split()
        }
        supervisor = local.process(real.process_name).pid()
        assert supervisor is not None
        root = real.containerd_root()
        assert root != RealNode(local.layout.home, real_node).containerd_root()
        assert not root_free(root)

        os.kill(supervisor, signal.SIGKILL)
        local.stop_real_node(name)

        assert not [c for c in cgroups if c.exists()]
        assert not [pid for pid in pids if alive(pid)]
        # The kernel removes a dead namespace's veth in the background.
        wait_for(lambda: host_link_name(real.ident) not in host_links(), 60, "the host link to go")
        assert str(real.state_dir) not in Path("/proc/self/mountinfo").read_text()
        assert root_free(root)
    finally:
        local.stop_real_node(name)
        kubectl("delete", "node", name, "--wait=false", check=False)


def test_a_service_name_resolves_and_balances_to_its_pod(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    """kube-proxy and CoreDNS on the real node: a ClusterIP Service's name resolves to its
    ClusterIP, and a connection to it reaches the pod behind it."""
    labels = {"app": "echo"}
    server = python_pod_on_real_node("echo", ECHO_SERVER)
    server["metadata"]["labels"] = labels
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]},
    }  # fmt: skip
    apply(kubectl, namespace, server, service)
    cluster_ip = get_json(kubectl, "service", "echo", "-n", namespace)["spec"]["clusterIP"]
    client = python_pod_on_real_node("asks", ECHO_CLIENT, f"echo.{namespace}.svc.cluster.local")

    ended = run_to_end(kubectl, namespace, client, 120)

    state = terminated(ended)
    assert ended["status"]["phase"] == "Succeeded", state
    assert json.loads(state["message"]) == {"address": cluster_ip, "answer": "echo"}


# The policy applies from when kube-router has seen the pod: until the excluded address stops
# answering (within a deadline), then the allowed one, once.
REACH = """
import json, socket, sys, time
allowed, excluded = sys.argv[1:]

def ask(address):
    try:
        with socket.create_connection((address, 8080), 3) as connection:
            return connection.recv(100).decode()
    except OSError as error:
        return type(error).__name__

deadline = time.monotonic() + 60
while (answer := ask(excluded)) == "echo" and time.monotonic() < deadline:
    time.sleep(0.5)
result = {"excluded": answer, "allowed": ask(allowed)}
open("/dev/termination-log", "w").write(json.dumps(result))
"""


def test_a_network_policy_keeps_a_pod_from_an_address_it_excludes(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    """kube-router's policy controller on the real node: a pod whose egress policy allows the
    pods' range except one address reaches another pod there, not the excluded one."""
    servers = {}
    for name in ("allowed", "excluded"):
        apply(kubectl, namespace, python_pod_on_real_node(name, ECHO_SERVER))
    for name in ("allowed", "excluded"):
        servers[name] = pod_ip_once_running(
            kubectl, namespace, name, 120, f"the {name} server to run"
        )
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "egress"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": str(POD_NETWORKS),
                                            "except": [f"{servers['excluded']}/32"]}}]}],
        },
    }  # fmt: skip
    apply(kubectl, namespace, policy)
    client = python_pod_on_real_node("client", REACH, servers["allowed"], servers["excluded"])
    client["metadata"]["labels"] = {"app": "client"}

    ended = run_to_end(kubectl, namespace, client, 120)

    result = json.loads(terminated(ended)["message"])
    # Dropped or rejected, as the enforcer chooses; never answered.
    assert result["excluded"] in ("TimeoutError", "ConnectionRefusedError"), result
    assert result["allowed"] == "echo", result
