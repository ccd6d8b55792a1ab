"""The e2e suite's set-up, as a platform team does it: the two images built from the Dockerfile,
kubetune installed through its Helm chart (the operator runs from its image as the chart's pod
under the chart's ServiceAccount and security context, on a node that runs every container from
its image), a tiny model and dataset written onto a PVC by a pod, FineTuneJobs applied with kubectl
(their trainer pods run from the trainer image on that node: e2ekit.tiny_job)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ekit import REPO, SYSTEM_NAMESPACE, operator_pods

from kubetune_devtools.installs import (
    built_images,
    helm_env,
    helm_set_args,
    image_node_chart_settings,
)
from kubetune_devtools.pytest_plugin import Kubectl, wait_for

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def kubetune_release(
    helm: Helm,
    kubectl: Kubectl,
    kubeconfig_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    image_node: str,
    request: pytest.FixtureRequest,
) -> Iterator[str]:
    """`helm install kubetune charts/kubetune`, watching every namespace, for this module, with
    the chart's images (kubetune/operator and kubetune/trainer at the chart's appVersion) and
    the module's own ``CHART_ARGS`` (helm arguments) where it has them."""
    built_images("operator", "trainer")
    module_args = list(getattr(request.module, "CHART_ARGS", ()))

    def not_terminating() -> bool:
        found = kubectl("get", "namespace", SYSTEM_NAMESPACE, "-o", "jsonpath={.status.phase}",
                        check=False)  # fmt: skip
        return found.returncode != 0 or found.stdout.strip() != "Terminating"

    # An earlier module's release leaves its namespace terminating: nothing can be made in it.
    wait_for(not_terminating, 300, f"namespace {SYSTEM_NAMESPACE} of the last release to go")
    env = helm_env(kubeconfig_path, tmp_path_factory.mktemp("helm"))
    install = helm("upgrade", "--install", "kubetune", str(REPO / "charts" / "kubetune"),
                   "--namespace", SYSTEM_NAMESPACE, "--create-namespace",
                   *helm_set_args(image_node_chart_settings()),
                   # The journeys' MLflow server takes basic auth over plain http on loopback.
                   "--set", "trainer.tracking.httpCredentialsHosts={127.0.0.1}",
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
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `mlflow server` (basic auth on) on the host's loopback: the local node runs pods
    on the host's network, so the trainer reaches it at 127.0.0.1."""
    from kubetune_devtools.mlflow_server import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server
