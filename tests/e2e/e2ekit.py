"""Helpers of the e2e suite (a module name of its own: each test folder has a conftest.py)."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubetune_devtools import tiny
from kubetune_devtools.installs import project_version
from kubetune_devtools.pytest_plugin import (
    Kubectl,
    apply,
    get_json,
    on_real_node,
    paced_poll,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
TINY_EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
SYSTEM_NAMESPACE = "kubetune-e2e"
CLAIM = "kubetune-demo"
#: The journeys' MLflow server, as trainer pods reach it (tests/e2e/conftest.py, ``mlflow``).
MLFLOW_SERVICE = f"mlflow.{SYSTEM_NAMESPACE}.svc.cluster.local"
T = TypeVar("T")


#: The operator's pods (the release's kubetune-server pod, with server.enabled, is not one).
OPERATOR_PODS = "app.kubernetes.io/instance=kubetune,app.kubernetes.io/component=operator"


def operator_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    pods = get_json(kubectl, "pods", "-n", SYSTEM_NAMESPACE, "-l", OPERATOR_PODS)["items"]
    return [
        p for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]  # fmt: skip


@functools.cache
def _tiny_assets() -> Path:
    """The tiny model, the toy datasets and the demo's manifest (``python -m
    kubetune_devtools.tiny``), written once a session."""
    directory = Path(tempfile.mkdtemp(prefix="kubetune-e2e-tiny-"))
    assert tiny.main([str(directory)]) == 0
    return directory


def seed_demo_claim(kubectl: Kubectl, namespace: str) -> None:
    """The PVC `kubetune-demo` with the tiny model and the toy datasets, copied into the
    directory behind it (as a platform team's data lands on its storage)."""
    claim = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip
    apply(kubectl, namespace, claim)
    volume = wait_for(
        lambda: get_json(kubectl, "pvc", CLAIM, "-n", namespace)["spec"].get("volumeName"),
        60,
        "the demo claim to bind",
    )
    directory = Path(get_json(kubectl, "pv", volume)["spec"]["hostPath"]["path"])
    shutil.copytree(_tiny_assets(), directory, dirs_exist_ok=True)
    # Readable by the trainer's non-root user (the model's weights are written owner-only); the
    # claim's top writable by any pod user again, as the provisioner made it (the copy took the
    # source's mode).
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    directory.chmod(0o777)


def run_pod(
    kubectl: Kubectl, namespace: str, name: str, command: list[str], timeout: float = 60
) -> str:
    """Run a one-off pod of the trainer image (its user) on the real node with the demo claim
    mounted; return its log once it succeeded."""
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": f"kubetune/trainer:{project_version()}",
                            "imagePullPolicy": "Never", "command": command,
                            "volumeMounts": [{"name": "d", "mountPath": f"/mnt/pvc/{CLAIM}"}]}],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": CLAIM}}],
            **on_real_node(),
        },
    }  # fmt: skip
    apply(kubectl, namespace, pod)

    def finished() -> str | None:
        phase = get_json(kubectl, "pod", name, "-n", namespace)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, timeout, f"pod {name} to finish")
    log = kubectl("logs", name, "-n", namespace).stdout
    assert phase == "Succeeded", log
    kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
    return log


def tiny_job(name: str = "tiny-reverse", **training: Any) -> dict[str, Any]:
    """examples/tiny-cpu.yaml, renamed, with its training section adjusted, scheduled onto the
    real node (the trainer image, under its limits and security context)."""
    manifest: dict[str, Any] = yaml.safe_load(TINY_EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["scheduling"] = on_real_node()
    manifest["spec"]["training"].update(training)
    manifest["spec"]["output"]["uri"] = f"pvc://{CLAIM}/adapters/{name}"
    return manifest


def ftj_status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_json(kubectl, "ftj", name, "-n", namespace).get("status") or {}
    return status


def wait_phase(
    kubectl: Kubectl, namespace: str, name: str, phases: set[str], patience: float
) -> dict[str, Any]:
    """The status once the job reaches one of ``phases``; fails only when the job stops moving
    (see ``wait_observing``), however long a busy machine makes the whole run."""
    found: dict[str, Any] = wait_observing(
        kubectl,
        namespace,
        name,
        lambda status: status if status.get("phase") in phases else None,
        patience,
        f"{name} to reach {sorted(phases)}",
    )
    return found


def wait_observing(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    done: Callable[[dict[str, Any]], T | None],
    patience: float,
    what: str,
) -> T:
    """Poll the job's status until ``done(status)`` returns something, and return it. The wait
    is paced (``paced_poll``): each change of phase, Ready reason, attempt or progress step
    starts a new wait for the next change (loading the model, a stretch of steps, a pod
    restarting take their own time), so a busy machine waits longer and a stuck job still fails.
    """

    def observe() -> tuple[T | None, tuple[Any, ...]]:
        status = ftj_status_or_empty(kubectl, namespace, name)
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        seen = (
            status.get("phase"),
            ready.get("reason"),
            status.get("attempts"),
            (status.get("progress") or {}).get("step"),
        )
        return done(status), seen

    result: T = paced_poll(observe, patience, f"{what} (phase/reason/attempts/step)")
    return result


def ftj_status_or_empty(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    """The status, or {} while the FineTuneJob can't be read (not there yet, a blip)."""
    result = kubectl("get", "ftj", name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    status: dict[str, Any] = json.loads(result.stdout).get("status") or {}
    return status
