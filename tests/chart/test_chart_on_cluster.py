"""The chart on the real local cluster: server-side dry-run of its manifests, then the whole
platform-team journey with the chart's own RBAC and nothing else:

helm install → the operator Deployment's pod runs from the operator image on the session's real
node (``real_node``: the upstream kubelet with containerd and runc), under the chart's
ServiceAccount (its projected token, in-cluster config) and security context → a namespace user
who holds only the built-in `edit` role (FineTuneJobs reach it through the chart's aggregated
ClusterRole) creates a tiny FineTuneJob, whose trainer runs from the trainer image on that node →
Succeeded → helm uninstall leaves none of the operator's objects.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, CI_VALUES, Helm

from kubetune_devtools.installs import helm_env, helm_set_args, real_node_chart_settings
from kubetune_devtools.pytest_plugin import (
    ClusterHandle,
    Kubectl,
    apply,
    create_namespace,
    get_json,
    on_real_node,
    real_node_images,
    wait_for,
)

pytestmark = pytest.mark.integration

RELEASE = "kt"
FULLNAME = "kt-kubetune"
CLAIM = "work"


@pytest.fixture
def team_namespace(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    """A second namespace: the operator lives in ``namespace``, the users' jobs in this one."""
    name = create_namespace(kubectl, f"team-{uuid.uuid4().hex[:6]}")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def run_helm(helm: Helm, env: dict[str, str], *args: str, timeout: float = 300) -> str:
    result = helm(*args, env=env, timeout=timeout)
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}{result.stdout}"
    return result.stdout


@pytest.fixture
def release_removed(
    helm: Helm, kubeconfig_path: Path, namespace: str, tmp_path: Path
) -> Iterator[None]:
    """Uninstall the test's release whatever happens: its cluster-scoped objects (the trainer
    status ValidatingAdmissionPolicy) would otherwise outlive a failed test and deny the next
    release's operator."""
    yield
    helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "2m",
         env=helm_env(kubeconfig_path, tmp_path), timeout=180)  # fmt: skip


def can_i(kubectl: Kubectl, user: str, *args: str) -> bool:
    result = kubectl("auth", "can-i", *args, "--as", user, check=False)
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.stem)
def test_rendered_manifests_pass_a_server_side_dry_run(
    helm: Helm, kubectl: Kubectl, namespace: str, values: Path
) -> None:
    watched = yaml.safe_load(values.read_text()).get("watchNamespaces")
    extra = ["--set", f"watchNamespaces={{{namespace}}}"] if watched else []
    rendered = helm("template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds",
                    "-f", str(values), *extra)  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    # The ServiceMonitor's CRD (Prometheus Operator) isn't part of a bare cluster.
    objects = [
        o for o in yaml.safe_load_all(rendered.stdout) if o and o["kind"] != "ServiceMonitor"
    ]

    result = kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts",
                     "--field-manager=helm-dry-run", "-n", namespace, "-f", "-",
                     input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))  # fmt: skip

    assert len(result.stdout.strip().splitlines()) == len(objects), result.stdout
    assert "(server dry run)" in result.stdout


@pytest.mark.usefixtures("release_removed")
def test_install_then_a_user_with_only_edit_trains_a_tiny_job_then_uninstall_leaves_nothing(
    helm: Helm,
    kubeconfig_path: Path,
    kubectl: Kubectl,
    namespace: str,
    team_namespace: str,
    tiny_assets: Path,
    tmp_path: Path,
    local_cluster: ClusterHandle,
    real_node: str,
) -> None:
    real_node_images(local_cluster, "operator", "trainer")
    operator_sa = f"system:serviceaccount:{namespace}:{FULLNAME}"
    user = f"system:serviceaccount:{team_namespace}:alice"
    helm_environ = helm_env(kubeconfig_path, tmp_path)
    settings = [
        f"watchNamespaces={{{team_namespace}}}",
        *real_node_chart_settings(local_cluster.local().layout.home),
        # No way back to an admin kubeconfig: in-cluster config (the pod's projected token for
        # the chart's ServiceAccount) is the operator's only credential.
        "operator.extraEnv[0].name=KUBECONFIG",
        "operator.extraEnv[0].value=/nonexistent/kubeconfig",
    ]
    install = run_helm(helm, helm_environ, "install", RELEASE, str(CHART), "--namespace", namespace,
                       *helm_set_args(settings), "--wait", "--timeout", "3m")  # fmt: skip
    assert f"kubectl -n {namespace} rollout status deployment/{FULLNAME}" in install
    assert f"kubectl apply -n {team_namespace} -f examples/tiny-cpu.yaml" in install

    # An upgrade changes a setting; the Deployment (Recreate) comes back with it.
    run_helm(helm, helm_environ, "upgrade", RELEASE, str(CHART), "--namespace", namespace,
             "--reuse-values", "--set", "operator.maxWorkers=4", "--wait", "--timeout", "3m")  # fmt: skip
    deployment = get_json(kubectl, "deployment", FULLNAME, "-n", namespace)
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_MAX_WORKERS"] == "4"

    def operator_pod() -> dict[str, Any] | None:
        pods = get_json(kubectl, "pods", "-n", namespace, "-l",
                        f"app.kubernetes.io/instance={RELEASE}")["items"]  # fmt: skip
        running = [p for p in pods if p["status"].get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        return running[0] if len(running) == 1 else None

    pod = wait_for(operator_pod, 120, "the operator pod to run")
    assert pod["spec"]["serviceAccountName"] == FULLNAME
    token_volumes = [v for v in pod["spec"]["volumes"] if "projected" in v]
    assert any("serviceAccountToken" in source for v in token_volumes
               for source in v["projected"]["sources"])  # fmt: skip

    # The chart's RBAC, as the apiserver sees it: the watched namespace only, no cluster-wide
    # Secrets, and status only through finetunejobs/status.
    assert can_i(kubectl, operator_sa, "create", "jobs.batch", "-n", team_namespace)
    assert can_i(
        kubectl,
        operator_sa,
        "patch",
        "finetunejobs.kubetune.io",
        "--subresource=status",
        "-n",
        team_namespace,
    )
    assert not can_i(kubectl, operator_sa, "get", "secrets", "-n", "default")
    assert not can_i(kubectl, operator_sa, "create", "jobs.batch", "-n", "default")
    assert not can_i(kubectl, operator_sa, "list", "secrets", "-n", team_namespace)
    # Jobs it may delete: a multi-pod group's failed attempt is replaced by a new Job.
    assert can_i(kubectl, operator_sa, "delete", "jobs.batch", "-n", team_namespace)
    assert not can_i(kubectl, operator_sa, "delete", "persistentvolumeclaims", "-n", team_namespace)

    # A namespace user with nothing but the built-in `edit` role.
    kubectl("create", "serviceaccount", "alice", "-n", team_namespace)
    kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit",
            f"--serviceaccount={team_namespace}:alice", "-n", team_namespace)  # fmt: skip
    wait_for(lambda: can_i(kubectl, user, "create", "finetunejobs.kubetune.io", "-n", team_namespace),
             60, "the aggregated edit role to cover FineTuneJobs")  # fmt: skip
    assert not can_i(
        kubectl,
        user,
        "patch",
        "finetunejobs.kubetune.io",
        "--subresource=status",
        "-n",
        team_namespace,
    )

    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    apply(kubectl, team_namespace, claim, as_user=user)
    volume_name = wait_for(
        lambda: get_json(kubectl, "pvc", CLAIM, "-n", team_namespace)["spec"].get("volumeName"),
        60, "the claim to bind",
    )  # fmt: skip
    volume = Path(get_json(kubectl, "pv", volume_name)["spec"]["hostPath"]["path"])
    shutil.copytree(tiny_assets / "model", volume / "model")
    shutil.copytree(tiny_assets / "data", volume / "data")
    # The trainer's non-root user reads the model and data and writes the adapter beside them.
    for path in [volume, *volume.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"uri": f"pvc://{CLAIM}/model"},
            "dataset": {"uri": f"pvc://{CLAIM}/data/reverse-prompt-completion.jsonl",
                        "format": "prompt-completion"},
            "quantization": {"type": "nf4", "computeDtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": 6, "learningRate": 1.0e-2, "batchSize": 4, "maxLength": 64,
                         "packing": False, "warmupRatio": 0.0, "checkpointSteps": 3,
                         "loggingSteps": 1, "gradientCheckpointing": False},
            "output": {"uri": f"pvc://{CLAIM}/adapter"},
            "resources": {"gpus": 0, "shmSize": "64Mi"},
            "runPolicy": {"backoffLimit": 1},
            "scheduling": on_real_node(),
        },
    }  # fmt: skip
    apply(kubectl, team_namespace, job, as_user=user)

    def finished() -> dict[str, Any] | None:
        status = get_json(kubectl, "ftj", "tiny", "-n", team_namespace).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(finished, 600, "the tiny job to finish", interval=1)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert status["result"]["adapter"]["uri"].startswith(f"pvc://{CLAIM}/adapter")
    # The trainer, with no API identity, reported to the chart's progress endpoint (TLS with the
    # chart's CA, its projected token reviewed under the chart's RBAC): the final step is there.
    assert status["progress"]["step"] == 6, json.dumps(status, indent=2)
    # The user reads the outcome with the same ordinary role.
    seen = kubectl("get", "ftj", "tiny", "-n", team_namespace, "--as", user, "-o", "json").stdout
    assert json.loads(seen)["status"]["phase"] == "Succeeded"

    run_helm(helm, helm_environ, "uninstall", RELEASE, "--namespace", namespace, "--wait",
             "--timeout", "2m")  # fmt: skip

    selector = f"app.kubernetes.io/instance={RELEASE}"
    for kinds, where in (
        ("deployments,replicasets,services,serviceaccounts,roles,rolebindings", ["-n", namespace]),
        ("roles,rolebindings", ["-n", team_namespace]),
        ("clusterroles,clusterrolebindings", []),
    ):
        left = wait_for(
            lambda k=kinds, w=where: not get_json(kubectl, k, *w, "-l", selector)["items"],  # type: ignore[misc]
            60, f"{kinds} of the release to go",
        )  # fmt: skip
        assert left
    wait_for(lambda: not get_json(kubectl, "pods", "-n", namespace, "-l", selector)["items"],
             120, "the operator pod to go")  # fmt: skip
    assert run_helm(helm, helm_environ, "list", "--namespace", namespace, "-q").strip() == ""
    # CRDs stay on purpose (Helm never deletes them: that would delete every FineTuneJob).
    assert kubectl("get", "crd", "finetunejobs.kubetune.io", check=False).returncode == 0
    # Users' jobs outlive the operator, and no finalizer of its holds them (or their namespace).
    left_job = get_json(kubectl, "ftj", "tiny", "-n", team_namespace)
    assert left_job["status"]["phase"] == "Succeeded"
    assert left_job["metadata"].get("finalizers", []) == []
