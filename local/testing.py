"""Pytest fixtures for tests against the real local cluster.

Load with ``pytest_plugins = ["kubetune.local.testing"]``. One cluster per test
session, in a temporary ``KUBETUNE_HOME`` (binaries come from the shared build
cache, so only the first session on a machine pays for the build); set
``KUBETUNE_TEST_HOME`` to the state dir of a running cluster
(``kubetune local up``) to reuse it instead. Its first node has no GPUs; tests
that need one take ``gpu_node`` or start nodes with ``add_node``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from kubetune.local.binaries import binaries_dir
from kubetune.local.controlplane import ClusterInfo, LocalCluster, NodeOptions

TEST_NODE = "kubetune-test"


@dataclass
class ClusterHandle:
    """A running local cluster, as tests see it."""

    cluster: LocalCluster
    info: ClusterInfo
    kubeconfig: Path
    kubectl_binary: Path
    owned: bool  # started by this session, so it stops it
    extra_nodes: list[str] = field(default_factory=list)


class Kubectl(Protocol):
    def __call__(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    reuse = os.environ.get("KUBETUNE_TEST_HOME")
    if reuse:
        cluster = LocalCluster(Path(reuse))
        if not cluster.ready():
            pytest.fail(f"KUBETUNE_TEST_HOME={reuse}: no ready cluster there")
        info = ClusterInfo.load(cluster.layout)
        owned = False
    else:
        cluster = LocalCluster(tmp_path_factory.mktemp("kubetune-home"))
        info = cluster.up(NodeOptions(name=TEST_NODE, gpus=0))
        owned = True
    handle = ClusterHandle(
        cluster, info, cluster.layout.kubeconfig, Path(info.bin_dir) / "kubectl", owned
    )
    yield handle
    if owned:
        cluster.down()


@pytest.fixture(scope="session")
def kubeconfig_path(local_cluster: ClusterHandle) -> Path:
    return local_cluster.kubeconfig


@pytest.fixture(scope="session")
def kube_api(kubeconfig_path: Path) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` with the admin credentials."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(kubeconfig_path))
    yield client
    client.close()


def _run_kubectl(
    handle: ClusterHandle,
    args: Sequence[str],
    input: str | None,
    check: bool,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(handle.kubectl_binary), "--kubeconfig", str(handle.kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}"
        )
    return result


@pytest.fixture(scope="session")
def kubectl(local_cluster: ClusterHandle) -> Kubectl:
    """Run the built kubectl against the cluster: ``kubectl("get", "pods", "-n", ns)``."""

    def run(
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        return _run_kubectl(local_cluster, args, input, check, timeout)

    return run


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    kubectl("create", "namespace", name)
    # Pods are rejected until the serviceaccount controller has made "default".
    wait_for(
        lambda: (
            kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0
        ),
        30,
        "default serviceaccount",
    )
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


AddNode = Callable[..., str]


@pytest.fixture
def add_node(local_cluster: ClusterHandle, kubectl: Kubectl) -> Iterator[AddNode]:
    """Start another node agent: ``add_node("gpu-a", gpus=2, labels=[...], taints=[...])``.

    The node is stopped and deleted after the test.
    """
    started: list[str] = []

    def add(
        name: str, gpus: int = 0, labels: Sequence[str] = (), taints: Sequence[str] = ()
    ) -> str:
        node = NodeOptions(name=name, gpus=gpus, labels=labels, taints=taints)
        local_cluster.cluster.start_node_agent(node)
        started.append(name)
        local_cluster.cluster.wait_node_ready(name, timeout=60)
        return name

    yield add
    for name in started:
        local_cluster.cluster.node_agent_process(name).stop()
        kubectl("delete", "node", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def gpu_node(local_cluster: ClusterHandle, kubectl: Kubectl) -> Iterator[str]:
    """A node with one ``nvidia.com/gpu``, for the rest of the session."""
    name = "kubetune-test-gpu"
    local_cluster.cluster.start_node_agent(NodeOptions(name=name, gpus=1))
    local_cluster.cluster.wait_node_ready(name, timeout=60)
    yield name
    local_cluster.cluster.node_agent_process(name).stop()
    kubectl("delete", "node", name, "--wait=false", check=False)


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5
) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def get_json(kubectl: Kubectl, *args: str) -> Any:
    """``kubectl get ... -o json``, parsed."""
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


__all__ = [
    "ClusterHandle",
    "Kubectl",
    "add_node",
    "binaries_dir",
    "get_json",
    "gpu_node",
    "kube_api",
    "kubeconfig_path",
    "kubectl",
    "local_cluster",
    "namespace",
    "wait_for",
]
