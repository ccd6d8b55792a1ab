"""Pytest fixtures for tests against the real local cluster.

Load with ``pytest_plugins = ["kubetune_devtools.pytest_plugin"]``. One cluster per test
session, in a temporary ``KUBETUNE_HOME`` (binaries come from the shared build
cache, so only the first session on a machine pays for the build), its node a real one
(``real_node``: the upstream kubelet, containerd and runc; root); set
``KUBETUNE_TEST_KUBECONFIG`` to reuse a running cluster instead (that of
``kubetune local up`` -- ``$(kubetune local kubeconfig)`` -- or any other, where
the tests that add nodes are skipped). The session's node has one ``nvidia.com/gpu``; tests
that need more start nodes with ``add_node``; suites whose pods run kubetune's trainer or its
stand-in take ``trainer_test_image``; tests of queueing take
``kueue``, tests of JobSet groups ``jobset``. Beside the fixtures, the
helpers the suites share: ``apply``, ``wait_for``, ``get_json``, ``pod_manifest``,
``run_to_end``, ``minimal_finetunejob``, and helm's environment and
settings for installing the chart on the local cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

import pytest
import yaml

from kubetune.local.binaries import binaries_dir
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.controlplane import LocalCluster, NodeOptions

#: The session's node: a real node (kubelet, containerd, runc), labelled ``REAL_NODE_ONLY``.
REAL_NODE = "kubetune-test-kubelet"
# The real node's label (and, on a node a test adds for them, taint): pods ``on_real_node()``
# select it.
REAL_NODE_ONLY = "kubetune.io/real-node"
TEST_NODE = REAL_NODE


@dataclass
class ClusterHandle:
    """A running cluster, as tests see it."""

    kubeconfig: Path
    kubectl_binary: Path
    cluster: LocalCluster | None  # None: a foreign cluster, nodes can't be added
    owned: bool  # started by this session, so it stops it

    def local(self) -> LocalCluster:
        """The local cluster, to add nodes to; skips the test on a foreign cluster."""
        if self.cluster is None:
            pytest.skip("needs a kubetune local cluster (KUBETUNE_TEST_KUBECONFIG is foreign)")
        return self.cluster


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
    """The session's cluster: started here, or the one ``KUBETUNE_TEST_KUBECONFIG`` names."""
    reuse = os.environ.get("KUBETUNE_TEST_KUBECONFIG")
    if reuse:
        kubeconfig = Path(reuse).resolve()
        # A kubeconfig written by `kubetune local up` sits in its state dir.
        home = kubeconfig.parent
        cluster = LocalCluster(home) if (home / "cluster.json").exists() else None
        if cluster is not None and not cluster.ready():
            pytest.fail(f"KUBETUNE_TEST_KUBECONFIG={reuse}: the cluster in {home} is not ready")
        bin_dir = Path(ClusterInfo.load(cluster.layout).bin_dir) if cluster else binaries_dir()
        yield ClusterHandle(kubeconfig, bin_dir / "kubectl", cluster, owned=False)
        return
    if os.geteuid() != 0:
        pytest.skip("the local cluster's node (kubelet, containerd, runc) needs root")
    from kubetune_devtools.installs import built_images

    built_images("operator")
    cluster = LocalCluster(tmp_path_factory.mktemp("kubetune-home"))
    info = cluster.up(session_node())
    try:
        yield ClusterHandle(
            cluster.layout.kubeconfig, Path(info.bin_dir) / "kubectl", cluster, owned=True
        )
    finally:
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


def run_kubectl(
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
        return run_kubectl(local_cluster, args, input, check, timeout)

    return run


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    yield from temporary_namespace(kubectl, f"{base}-{uuid.uuid4().hex[:5]}")


def create_namespace(kubectl: Kubectl, name: str) -> str:
    """Create namespace ``name`` and wait until pods can be created in it."""
    kubectl("create", "namespace", name)
    # Pods are rejected until the serviceaccount controller has made "default".
    wait_for(
        lambda: (
            kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0
        ),
        30,
        "default serviceaccount",
    )
    return name


def temporary_namespace(kubectl: Kubectl, name: str) -> Iterator[str]:
    """For a fixture to ``yield from``: namespace ``name``, created, then deleted (without
    waiting) once the fixture is torn down."""
    create_namespace(kubectl, name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


AddNode = Callable[..., str]


@pytest.fixture
def add_node(local_cluster: ClusterHandle, kubectl: Kubectl) -> Iterator[AddNode]:
    """Start another real node (as ``real_node``, root only) holding the operator image
    (``operator_image()``): ``add_node("gpu-a", gpus=2, labels=[...], taints=[...])``.

    The node is stopped and deleted after the test.
    """
    started: list[str] = []

    def add(
        name: str, gpus: int = 0, labels: Sequence[str] = (), taints: Sequence[str] = ()
    ) -> str:
        local = local_cluster.local()
        if os.geteuid() != 0:
            pytest.skip("a real node (kubelet, containerd, runc) needs root")
        from kubetune_devtools.installs import built_images

        built_images("operator")
        node = NodeOptions(
            name=name, gpus=gpus, labels=labels, taints=taints, images=(operator_image(),)
        )
        started.append(name)
        local.start_real_node(node)
        return name

    yield add
    for name in started:
        local_cluster.local().stop_real_node(name)
        kubectl("delete", "node", name, "--wait=false", check=False)


def session_node() -> NodeOptions:
    """The node of the cluster a session starts: the real node ``REAL_NODE`` with one GPU and
    the operator image; untainted, so every suite's pods run there, and labelled, so
    ``on_real_node()`` pods select it."""
    return NodeOptions(
        name=REAL_NODE, gpus=1, labels=[f"{REAL_NODE_ONLY}=only"], images=(operator_image(),)
    )


class Dedication(TypedDict):
    labels: list[str]
    taints: list[str]


def dedicated_to(key: str) -> Dedication:
    """A node's labels and taints (NodeOptions fields) that keep it for pods ``placed_on(key)``:
    labelled and tainted ``key=only``."""
    return Dedication(labels=[f"{key}=only"], taints=[f"{key}=only:NoSchedule"])


def placed_on(key: str) -> dict[str, Any]:
    """The pod-spec fields (nodeSelector, tolerations) that put a pod on a node
    ``dedicated_to(key)``."""
    return {
        "nodeSelector": {key: "only"},
        "tolerations": [{"key": key, "operator": "Exists", "effect": "NoSchedule"}],
    }


@pytest.fixture(scope="session")
def real_node(local_cluster: ClusterHandle, kubectl: Kubectl) -> Iterator[str]:
    """The session's real node: the upstream kubelet with containerd, runc and CNI plugins built
    from their Go modules (hack/node/build.sh), one ``nvidia.com/gpu``, the operator image of
    ``make images`` imported into its containerd, labelled ``kubetune.io/real-node=only`` (see
    ``on_real_node``). The cluster this session started runs it as its node; on a reused local
    cluster it is started beside that cluster's nodes, tainted so that only pods
    ``on_real_node()`` go there, and stopped after the session. It needs root."""
    if local_cluster.owned:
        yield REAL_NODE
        return
    if os.geteuid() != 0:
        pytest.skip("a real node (kubelet, containerd, runc) needs root")
    from kubetune_devtools.installs import built_images

    built_images("operator")
    local = local_cluster.local()
    local.start_real_node(
        NodeOptions(
            name=REAL_NODE, gpus=1, **dedicated_to(REAL_NODE_ONLY), images=(operator_image(),)
        )
    )
    yield REAL_NODE
    local.stop_real_node(REAL_NODE)
    kubectl("delete", "node", REAL_NODE, "--wait=false", check=False)


@pytest.fixture(scope="session")
def trainer_test_image(local_cluster: ClusterHandle, real_node: str) -> str:
    """The tests' trainer image (``kubetune/trainer-test``: the trainer image plus the stand-in
    trainer, hack/images/test/Containerfile), built (at once when cached) and imported into the
    session's real node's containerd (at once when it holds that digest); its reference."""
    real_node_images(local_cluster, "trainer-test")
    return trainer_test_image_reference()


def trainer_test_image_reference() -> str:
    """``kubetune/trainer-test:<version>``: what ``trainer_test_image`` imports."""
    from kubetune_devtools.installs import project_version

    return f"kubetune/trainer-test:{project_version()}"


def operator_image() -> str:
    """The operator image of ``make images`` (``real_node`` holds it): a slim Python with
    kubetune and a shell, the stand-in image of the tests' pods on a real node."""
    from kubetune_devtools.installs import project_version

    return f"kubetune/operator:{project_version()}"


def on_real_node() -> dict[str, Any]:
    """The pod-spec fields (nodeSelector, tolerations) that put a pod on ``real_node``."""
    return placed_on(REAL_NODE_ONLY)


def real_node_images(local_cluster: ClusterHandle, *targets: str) -> None:
    """Build the Dockerfile's ``targets`` (at once when cached) and put them into the session's
    real node's containerd, unless it holds them already (the same digest)."""
    from kubetune_devtools.installs import built_images, project_version

    built_images(*targets)
    local_cluster.local().import_images(
        REAL_NODE, [f"kubetune/{target}:{project_version()}" for target in targets]
    )


#: A pod's program (``python -c``): answers ``echo`` to every connection on port 8080.
ECHO_SERVER = """
import socket
server = socket.create_server(("", 8080))
while True:
    connection, _ = server.accept()
    with connection:
        connection.sendall(b"echo")
"""


@pytest.fixture(scope="session")
def kueue(local_cluster: ClusterHandle) -> Iterator[None]:
    """Kueue (built from its Go module, hack/kueue) running beside the session's cluster, with
    its CRDs installed, for the rest of the session. A reused cluster keeps a Kueue it already
    ran (``kubetune local up --kueue``); one started here is stopped after the session. It
    admits only Jobs that name a LocalQueue, so suites without queues don't notice it."""
    local = local_cluster.local()
    already_running = local.process("kueue").pid() is not None
    local.start_kueue()
    yield
    if not already_running:
        local.process("kueue").stop()


@pytest.fixture(scope="session")
def jobset(local_cluster: ClusterHandle) -> Iterator[None]:
    """JobSet's controller (built from its Go module, hack/jobset) running beside the session's
    cluster, with its CRD installed, for the rest of the session (a Kueue running already is
    started again to admit JobSets). A reused cluster keeps a controller it already ran
    (``kubetune local up --jobset``); one started here is stopped after the session (its CRD
    stays)."""
    local = local_cluster.local()
    already_running = local.process("jobset").pid() is not None
    local.start_jobset()
    yield
    if not already_running:
        local.process("jobset").stop()


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


#: A paced wait allows the next change this many times the longest gap between changes so far.
PACE_FACTOR = 4.0


def paced_poll(
    observe: Callable[[], tuple[Any, tuple[Any, ...]]], patience: float, what: str
) -> Any:
    """Poll ``observe()`` — (a result or None, what it saw) — until it has a result; return it.

    The deadline is not a constant: it moves with what is seen. Each change starts a new wait
    for the next, of ``PACE_FACTOR`` × the longest gap between changes so far, and never less than
    ``patience`` (the allowance for the first change). A slow machine makes every gap longer and
    the waits with them; something that stops moving fails in about ``PACE_FACTOR`` of its own
    slowest pace.
    """
    last: tuple[Any, ...] | None = None
    changed_at = time.monotonic()
    longest = 0.0
    while True:
        result, seen = observe()
        if result is not None:
            return result
        now = time.monotonic()
        if seen != last:
            if last is not None:
                longest = max(longest, now - changed_at)
            last, changed_at = seen, now
        allowed = max(patience, PACE_FACTOR * longest)
        if now - changed_at > allowed:
            raise AssertionError(
                f"{what}: nothing moved for {now - changed_at:.0f}s (allowed {allowed:.0f}s: "
                f"{PACE_FACTOR:g} x the longest gap seen, {longest:.0f}s); last seen {seen}"
            )
        time.sleep(1)


def install_crd(kubectl: Kubectl, path: Path) -> None:
    """Apply the CRD at ``path`` (server-side) and wait until the apiserver serves it. Polls the
    CRD's Established condition: ``kubectl wait`` right after the apply can fail on a CRD that
    has no status.conditions yet."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]

    def established() -> bool:
        conditions = get_json(kubectl, "crd", name).get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, 60, f"the CRD {name} to be established")


def get_json(kubectl: Kubectl, *args: str) -> Any:
    """``kubectl get ... -o json``, parsed."""
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def apply(
    kubectl: Kubectl, namespace: str, *objects: Mapping[str, Any], as_user: str | None = None
) -> None:
    """``kubectl apply -n namespace`` the objects (several go as one List), as ``as_user``."""
    manifest = (
        objects[0]
        if len(objects) == 1
        else {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    )
    impersonate = ["--as", as_user] if as_user else []
    kubectl("apply", "-n", namespace, *impersonate, "-f", "-", input=json.dumps(manifest))


def run_to_end(
    kubectl: Kubectl, namespace: str, pod: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Apply ``pod`` and wait (up to ``timeout`` seconds) till it succeeds or fails; the pod as
    it ended."""
    apply(kubectl, namespace, pod)
    name = pod["metadata"]["name"]

    def done() -> dict[str, Any] | None:
        current = get_json(kubectl, "pod", name, "-n", namespace)
        return current if current["status"].get("phase") in ("Succeeded", "Failed") else None

    return dict(wait_for(done, timeout, f"pod {name} to finish"))


def pod_manifest(name: str, *containers: Mapping[str, Any], **spec: Any) -> dict[str, Any]:
    """A Pod ``name`` that runs ``containers`` once (restartPolicy Never), with ``spec``'s other
    pod-spec fields."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", **spec, "containers": list(containers)},
    }


def python_pod_on_real_node(
    name: str,
    program: str,
    *args: str,
    container: Mapping[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A Pod ``name`` on ``real_node`` that runs ``python -c program args`` once in the operator
    image (which the real node has in its containerd), with ``container``'s other container
    fields and ``spec``'s other pod-spec fields."""
    main = {
        "name": "main",
        "image": operator_image(),
        "imagePullPolicy": "Never",
        "command": ["python", "-c", program, *args],
        **(container or {}),
    }
    return pod_manifest(name, main, **on_real_node(), **spec)


@contextlib.contextmanager
def port_forward(
    handle: ClusterHandle, namespace: str, target: str, port: int, timeout: float = 120
) -> Iterator[int]:
    """``kubectl port-forward`` from a free loopback port of the host to ``port`` of ``target``
    (``service/NAME``, ``pod/NAME``) while the block runs; yields the local port. The host
    reaches no pod address of a real node directly (docs/local-cluster.md)."""
    process = subprocess.Popen(
        [str(handle.kubectl_binary), "--kubeconfig", str(handle.kubeconfig), "port-forward",
         "-n", namespace, target, f":{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        # "Forwarding from 127.0.0.1:41235 -> 8080", once it listens; nothing if it exits.
        first = process.stdout.readline()
        found = re.search(r"127\.0\.0\.1:(\d+) ->", first)
        if not found:
            process.kill()
            _, err = process.communicate(timeout=timeout)
            raise AssertionError(f"kubectl port-forward {target}: {first}{err}")
        yield int(found[1])
    finally:
        process.kill()
        process.wait(timeout=timeout)


def pod_ip_once_running(
    kubectl: Kubectl, namespace: str, name: str, timeout: float, what: str
) -> str:
    """Wait (up to ``timeout`` seconds, for ``what``) till pod ``name`` runs; its address."""
    return str(
        wait_for(
            lambda: (
                (pod := get_json(kubectl, "pod", name, "-n", namespace))["status"].get("phase")
                == "Running"
                and pod["status"].get("podIP")
            ),
            timeout,
            what,
        )
    )


def minimal_finetunejob(name: str = "minimal", **spec: Any) -> dict[str, Any]:
    """A FineTuneJob ``name`` with only the required fields (model, dataset, output), plus
    ``spec``'s sections: a new dict on every call."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "meta-llama/Llama-2-7b-hf"},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "output": {"uri": f"pvc://adapters/{name}"},
            **spec,
        },
    }


__all__ = [
    "ECHO_SERVER",
    "ClusterHandle",
    "Dedication",
    "Kubectl",
    "add_node",
    "apply",
    "binaries_dir",
    "create_namespace",
    "dedicated_to",
    "get_json",
    "jobset",
    "kube_api",
    "kubeconfig_path",
    "kubectl",
    "kueue",
    "local_cluster",
    "minimal_finetunejob",
    "namespace",
    "on_real_node",
    "operator_image",
    "placed_on",
    "pod_ip_once_running",
    "pod_manifest",
    "port_forward",
    "python_pod_on_real_node",
    "real_node",
    "real_node_images",
    "run_kubectl",
    "run_to_end",
    "session_node",
    "temporary_namespace",
    "trainer_test_image",
    "trainer_test_image_reference",
    "wait_for",
]
