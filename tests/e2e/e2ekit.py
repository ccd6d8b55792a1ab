"""Helpers of the e2e suite (a module name of its own: each test folder has a conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune_devtools.pytest_plugin import Kubectl, apply, get_json, on_image_node, wait_for

REPO = Path(__file__).resolve().parents[2]
TINY_EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
SYSTEM_NAMESPACE = "kubetune-e2e"
CLAIM = "kubetune-demo"


def operator_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    pods = get_json(kubectl, "pods", "-n", SYSTEM_NAMESPACE, "-l",
                    "app.kubernetes.io/instance=kubetune")["items"]  # fmt: skip
    return [
        p for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]  # fmt: skip


def seed_demo_claim(kubectl: Kubectl, namespace: str) -> None:
    """The PVC `kubetune-demo` with the tiny model and the toy datasets, written by a pod."""
    claim = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip
    apply(kubectl, namespace, claim)
    run_pod(kubectl, namespace, "seed-data",
            ["python", "-m", "kubetune_devtools.tiny", f"/mnt/pvc/{CLAIM}"], timeout=180)  # fmt: skip


def run_pod(
    kubectl: Kubectl, namespace: str, name: str, command: list[str], timeout: float = 60
) -> str:
    """Run a one-off pod with the demo claim mounted; return its log once it succeeded."""
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "kubetune/trainer", "command": command,
                            "volumeMounts": [{"name": "d", "mountPath": f"/mnt/pvc/{CLAIM}"}]}],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": CLAIM}}],
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
    node that runs containers from their images (the trainer image, not the host's Python)."""
    manifest: dict[str, Any] = yaml.safe_load(TINY_EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["scheduling"] = on_image_node()
    manifest["spec"]["training"].update(training)
    manifest["spec"]["output"]["uri"] = f"pvc://{CLAIM}/adapters/{name}"
    return manifest


def ftj_status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_json(kubectl, "ftj", name, "-n", namespace).get("status") or {}
    return status


def wait_phase(
    kubectl: Kubectl, namespace: str, name: str, phases: set[str], timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = ftj_status(kubectl, namespace, name)
        return status if status.get("phase") in phases else None

    found: dict[str, Any] = wait_for(reached, timeout, f"{name} to reach {sorted(phases)}", 1)
    return found
