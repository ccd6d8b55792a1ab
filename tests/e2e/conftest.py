"""The e2e suite's set-up, as a platform team does it: the two images built from the Dockerfile,
kubetune installed through its Helm chart, packaged by `make chart` and taken from a real OCI
registry by its oci:// reference as GitOps tools install charts (the operator runs from its image as the chart's pod
under the chart's ServiceAccount and security context, on the session's real node: the upstream
kubelet with containerd and runc, which enforce them), a tiny model and dataset written onto a PVC
by a pod, FineTuneJobs applied with kubectl (their trainer pods run from the trainer image on that
node: e2ekit.tiny_job)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ekit import MLFLOW_SERVICE, SYSTEM_NAMESPACE, operator_pods

from kubetune_devtools.installs import (
    helm_env,
    helm_set_args,
    push_chart,
    real_node_chart_settings,
    real_node_state,
)
from kubetune_devtools.pytest_plugin import (
    ClusterHandle,
    Kubectl,
    apply,
    real_node_images,
    wait_for,
)

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def chart_in_registry(
    helm: Helm, registry_tools: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """`make chart`, then `helm push` of the package to a registry of its own that asks for a
    login; yields the chart's oci:// reference, its version and helm's registry arguments."""
    from kubetune_devtools.oci import start_test_registry

    registry = start_test_registry(tmp_path_factory.mktemp("chart-registry"), registry_tools)
    try:
        yield push_chart(helm, registry, tmp_path_factory.mktemp("chart"))
    finally:
        registry.process.close()


@pytest.fixture(scope="module")
def kubetune_release(
    helm: Helm,
    chart_in_registry: tuple[str, str, tuple[str, ...]],
    kubectl: Kubectl,
    kubeconfig_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    local_cluster: ClusterHandle,
    real_node: str,
    request: pytest.FixtureRequest,
) -> Iterator[str]:
    """`helm install kubetune oci://…/charts/kubetune --version <chart's>` (the chart from the
    registry, not the folder), watching every namespace, for this module, with
    the chart's images (kubetune/operator and kubetune/trainer at the chart's appVersion, in the
    real node's containerd) and the module's own ``CHART_ARGS`` (helm arguments) where it has
    them."""
    real_node_images(local_cluster, "operator", "trainer")
    module_args = list(getattr(request.module, "CHART_ARGS", ()))

    def not_terminating() -> bool:
        found = kubectl("get", "namespace", SYSTEM_NAMESPACE, "-o", "jsonpath={.status.phase}",
                        check=False)  # fmt: skip
        return found.returncode != 0 or found.stdout.strip() != "Terminating"

    # An earlier module's release leaves its namespace terminating: nothing can be made in it.
    wait_for(not_terminating, 300, f"namespace {SYSTEM_NAMESPACE} of the last release to go")
    env = helm_env(kubeconfig_path, tmp_path_factory.mktemp("helm"))
    reference, version, login = chart_in_registry
    install = helm("upgrade", "--install", "kubetune", reference, "--version", version, *login,
                   "--namespace", SYSTEM_NAMESPACE, "--create-namespace",
                   *helm_set_args(real_node_chart_settings(local_cluster.local().layout.home)),
                   # The journeys' MLflow server takes basic auth over plain http in the cluster.
                   "--set", f"trainer.tracking.httpCredentialsHosts={{{MLFLOW_SERVICE}}}",
                   *module_args, "--wait", "--timeout", "3m",
                   env=env, timeout=240)  # fmt: skip
    assert install.returncode == 0, install.stderr
    wait_for(lambda: len(operator_pods(kubectl)) == 1, 120, "the operator pod to run")
    yield SYSTEM_NAMESPACE
    helm("uninstall", "kubetune", "--namespace", SYSTEM_NAMESPACE, "--wait", env=env)
    kubectl("delete", "namespace", SYSTEM_NAMESPACE, "--wait=false", check=False)


@pytest.fixture
def cpu_hog() -> Iterator[int]:
    """One busy loop per core, at normal priority, for the test's duration: the machine as busy
    as it gets when other work shares it. Yields how many loops run."""
    count = os.cpu_count() or 1
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(count)
    ]
    try:
        yield count
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


@pytest.fixture(scope="module")
def mlflow(
    tmp_path_factory: pytest.TempPathFactory,
    kubectl: Kubectl,
    local_cluster: ClusterHandle,
    kubetune_release: str,
) -> Iterator[Any]:
    """A real `mlflow server` (basic auth on) on the host, on its side of the real node's link,
    and a Service without selector whose EndpointSlice is that address: trainer pods reach it as
    ``MLFLOW_SERVICE`` (cluster DNS, then kube-proxy), as they would an MLflow of the platform's
    outside the cluster; the test reaches it at ``url``."""
    from kubetune_devtools.mlflow_server import mlflow_server

    host = real_node_state(local_cluster.local().layout.home).host_address
    with mlflow_server(
        tmp_path_factory.mktemp("mlflow"), host=host, names=[MLFLOW_SERVICE]
    ) as server:
        port = int(server.url.rsplit(":", 1)[1])
        name = MLFLOW_SERVICE.split(".")[0]
        service = {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]},
        }  # fmt: skip
        endpoints = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [host]}],
        }  # fmt: skip
        apply(kubectl, kubetune_release, service, endpoints)
        yield server
        kubectl("delete", "service", name, "-n", kubetune_release, check=False)
        kubectl("delete", "endpointslice", name, "-n", kubetune_release, check=False)
