"""The `kubetune` command against a real cluster: `kubetune logs` across attempts, and the same
command as a kubectl plugin. The FineTuneJob's status is written here as the operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from kubetune_devtools.pytest_plugin import (
    ClusterHandle,
    Kubectl,
    apply,
    get_json,
    install_crd,
    minimal_finetunejob,
    on_real_node,
    operator_image,
    pod_manifest,
    wait_for,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB = minimal_finetunejob("logged", runPolicy={"suspend": True})


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> None:
    install_crd(kubectl, REPO / "crds" / "finetunejobs.kubetune.io.yaml")


def trainer_pod(name: str, script: str) -> dict[str, Any]:
    """A pod on the real node that runs ``script`` in the operator image's shell."""
    container = {"name": "trainer", "image": operator_image(), "imagePullPolicy": "Never",
                 "command": ["sh", "-c", script]}  # fmt: skip
    return pod_manifest(name, container, **on_real_node())


def set_status(kubectl: Kubectl, namespace: str, **status: Any) -> None:
    kubectl("patch", "ftj", "logged", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))  # fmt: skip


def pod_phase(kubectl: Kubectl, namespace: str, name: str) -> str:
    return str(get_json(kubectl, "pod", name, "-n", namespace)["status"].get("phase"))


def validation_pod(name: str, script: str) -> dict[str, Any]:
    """A pod as the operator labels the Validating phase's (status.podName never names it)."""
    pod = trainer_pod(name, script)
    pod["metadata"]["labels"] = {"app.kubernetes.io/component": "validator"}
    pod["metadata"]["annotations"] = {"kubetune.io/finetunejob": "logged"}
    return pod


def test_kubetune_logs_follows_the_validation_then_the_trainer_across_attempts_until_the_end(
    crd: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path, real_node: str
) -> None:
    apply(kubectl, namespace, JOB)
    apply(kubectl, namespace, validation_pod("logged-validation", "sleep 2; echo preflight-ok"))
    # Another job's validation pod in the same namespace, newer (or listed first), is not followed.
    other = validation_pod("a-other-validation", "echo not-this-one")
    other["metadata"]["annotations"] = {"kubetune.io/finetunejob": "other"}
    apply(kubectl, namespace, other)
    set_status(kubectl, namespace, phase="Validating")

    follower = subprocess.Popen(
        [str(BIN / "kubetune"), "logs", "logged", "-n", namespace, "-f",
         "--kubeconfig", str(kubeconfig_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: "preflight-ok\n" in lines, 60, "the validation pod's log")
        apply(kubectl, namespace, trainer_pod("logged-a", "echo from-attempt-one; exit 1"))
        wait_for(lambda: pod_phase(kubectl, namespace, "logged-a") == "Failed", 60, "attempt one")
        set_status(kubectl, namespace, phase="Running", podName="logged-a", attempts=1)
        wait_for(lambda: "from-attempt-one\n" in lines, 60, "the first attempt's log")
        apply(kubectl, namespace, trainer_pod("logged-b", "sleep 2; echo from-attempt-two"))
        set_status(kubectl, namespace, phase="Running", podName="logged-b", attempts=2)
        wait_for(lambda: pod_phase(kubectl, namespace, "logged-b") == "Succeeded", 60, "attempt 2")
        set_status(kubectl, namespace, phase="Succeeded")
        follower.wait(timeout=60)
    finally:
        follower.kill()
        reader.join(timeout=10)
    assert follower.returncode == 0, follower.stderr.read() if follower.stderr else ""
    shown = [line.rstrip("\n") for line in lines]
    assert shown == [
        "--- logged: validation pod logged-validation ---",
        "preflight-ok",
        "--- logged: pod logged-a (attempt 1) ---",
        "from-attempt-one",
        "--- logged: pod logged-b (attempt 2) ---",
        "from-attempt-two",
    ]


def test_kubetune_is_a_kubectl_plugin(local_cluster: ClusterHandle) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(local_cluster.kubectl_binary), *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert str(BIN / "kubectl-kubetune") in kubectl("plugin", "list").stdout
    validated = kubectl("kubetune", "validate", str(REPO / "examples" / "tiny-cpu.yaml"))
    assert validated.returncode == 0, validated.stderr
    assert "is valid" in validated.stdout
    assert kubectl("kubetune", "--help").stdout.startswith("usage: kubectl kubetune")
