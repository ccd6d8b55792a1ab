"""A FineTuneJob with an oci:// output on the real control plane: the operator runs the tiny job,
its trainer (a pod of the real node) pushes to a real registry (distribution's, asking for the
login of a kubernetes.io/dockerconfigjson Secret; on the host's side of the node's link, behind a
Service, ``host_service``), status pins the artifact by the digest the registry
holds, and oras pulls back the files on the checkpoint claim. What the settings or the references
policy refuse is refused naming the field."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from operatorkit import (
    CLAIM,
    CRD,
    REPO,
    OperatorProcess,
    host_service,
    log_tail_after,
    started,
    work_claim,
)

from kubetune_devtools.installs import real_node_state
from kubetune_devtools.oci import LoginRegistry, running_test_registry
from kubetune_devtools.pytest_plugin import ClusterHandle, Kubectl, get_json, install_crd, wait_for

pytestmark = pytest.mark.integration

TENANT = "oci-tenant@example.com"


@pytest.fixture(scope="module")
def registry(
    registry_tools: Path,
    local_cluster: ClusterHandle,
    kubectl: Kubectl,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LoginRegistry]:
    """The registry on the host's side of the real node's link, named by the Service in front
    of it (the trainers' way there)."""
    link = real_node_state(local_cluster.local().layout.home).host_address

    def published(port: int) -> str:
        return f"{host_service(kubectl, f'registry-{port}', link, port)}:{port}"

    root = tmp_path_factory.mktemp("oci")
    with running_test_registry(root, registry_tools, link, published) as started_registry:
        yield started_registry


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl,
    kubeconfig_path: Path,
    registry: LoginRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    install_crd(kubectl, CRD)
    # Any port of the registry's Service address may be named; plain http only to the test's
    # own registry.
    settings = {
        "KUBETUNE_ALLOWED_REGISTRIES": f"{service_address(registry)}:*",
        "KUBETUNE_PLAIN_HTTP_REGISTRIES": registry.host,
    }
    log = tmp_path_factory.mktemp("operator") / "log"
    yield from started(OperatorProcess(kubeconfig_path, log, env=settings))


def service_address(registry: LoginRegistry) -> str:
    return registry.host.rpartition(":")[0]


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


def apply(kubectl: Kubectl, namespace: str, name: str, spec: dict[str, Any]) -> None:
    manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name}, "spec": spec}  # fmt: skip
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def finished(kubectl: Kubectl, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = get_json(kubectl, "ftj", name, "-n", namespace).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status: dict[str, Any] = wait_for(check, timeout, f"FineTuneJob {name} to finish")
    return status


def failed_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Failed")


def oci_spec(output: str, **registry: Any) -> dict[str, Any]:
    """The tiny job (model and data on the work claim) with an oci:// output whose checkpoints
    go to the work claim."""
    return {
        "model": {"uri": f"pvc://{CLAIM}/model"},
        "dataset": {"uri": f"pvc://{CLAIM}/data/reverse-prompt-completion.jsonl",
                    "format": "prompt-completion"},
        "quantization": {"type": "nf4", "computeDtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 6, "learningRate": 1.0e-2, "batchSize": 4, "maxLength": 64,
                     "packing": False, "checkpointSteps": 3, "loggingSteps": 1,
                     "gradientCheckpointing": False},
        "output": {"uri": output, "checkpointUri": f"pvc://{CLAIM}/checkpoints",
                   "registry": {"plainHttp": True, **registry}},
        "resources": {"gpus": 0, "shmSize": "64Mi"},
        "runPolicy": {"backoffLimit": 0},
    }  # fmt: skip


def registry_secret(kubectl: Kubectl, namespace: str, registry: LoginRegistry) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
              "metadata": {"name": "regcred"},
              "stringData": {".dockerconfigjson": registry.auth_file.read_text()}}  # fmt: skip
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))


def test_the_adapter_is_pushed_and_status_pins_the_digest_oras_pulls_back_and_a_job_continues(
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    registry: LoginRegistry,
    tiny_assets: Path,
    tmp_path: Path,
) -> None:
    volume = work_claim(kubectl, namespace)
    shutil.copytree(tiny_assets / "model", volume / "model")
    shutil.copytree(tiny_assets / "data", volume / "data")
    registry_secret(kubectl, namespace, registry)
    output = f"oci://{registry.host}/{namespace}/tiny:v1"
    apply(kubectl, namespace, "pushed",
          oci_spec(output, credentialsSecretRef={"name": "regcred"}))  # fmt: skip

    status = finished(kubectl, namespace, "pushed", 600)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    digest = registry.oras("resolve", output.removeprefix("oci://")).stdout.strip()
    adapter = status["result"]["adapter"]
    assert adapter["uri"] == f"oci://{registry.host}/{namespace}/tiny@{digest}"

    registry.oras("pull", adapter["uri"].removeprefix("oci://"), "--output", str(tmp_path))
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == adapter["sha256"]
    assert len(weights) == adapter["sizeBytes"]
    kept = volume / "checkpoints"
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (tmp_path / name).read_bytes() == (kept / name).read_bytes(), name
    assert sorted(p.name for p in (kept / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
    ]

    # A second job continues that adapter, pulled by the digest status names, with the same
    # Secret's login; its result says what it started from.
    second = oci_spec(f"oci://{registry.host}/{namespace}/tiny:v2")
    second["model"]["adapter"] = {
        "uri": adapter["uri"],
        "registry": {"plainHttp": True, "credentialsSecretRef": {"name": "regcred"}},
    }
    second["output"] = {"uri": f"pvc://{CLAIM}/continued"}
    apply(kubectl, namespace, "continued", second)
    status = finished(kubectl, namespace, "continued", 600)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert status["result"]["baseModel"]["adapter"] == adapter["uri"]
    card = (volume / "continued" / "README.md").read_text()
    assert f"- continued from the adapter `{adapter['uri']}`" in card

    shown = kubectl("get", "ftj", "pushed", "-n", namespace, "-o", "yaml").stdout
    events = kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout
    auth = json.loads(registry.auth_file.read_text())["auths"][registry.host]["auth"]
    for secret in (registry.password, auth):
        for where, text in (("status", shown), ("events", events),
                            ("operator log", operator.log_path.read_text())):  # fmt: skip
            assert secret not in text, where


def test_a_registry_the_settings_dont_allow_fails_the_job_denied_naming_the_field(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, registry: LoginRegistry
) -> None:
    apply(kubectl, namespace, "elsewhere", oci_spec("oci://registry.example.com/team/tiny"))
    status = finished(kubectl, namespace, "elsewhere", 60)
    failed = failed_condition(status)
    assert failed["reason"] == "Denied"
    assert failed["message"].startswith(
        "spec.output.uri: registry 'registry.example.com' is not allowed by the operator's "
        f"settings (KUBETUNE_ALLOWED_REGISTRIES: {service_address(registry)}:*)"
    )
    assert get_json(kubectl, "jobs", "-n", namespace)["items"] == []


def test_plain_http_to_a_registry_the_settings_dont_name_fails_the_job_denied(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, registry: LoginRegistry
) -> None:
    other = f"{service_address(registry)}:1"
    apply(kubectl, namespace, "plain", oci_spec(f"oci://{other}/team/tiny"))
    status = finished(kubectl, namespace, "plain", 60)
    failed = failed_condition(status)
    assert failed["reason"] == "Denied"
    assert failed["message"].startswith(
        f"spec.output.registry.plainHttp: registry '{other}' may be reached only over https"
    )
    assert get_json(kubectl, "jobs", "-n", namespace)["items"] == []


@pytest.fixture
def tenant(kubectl: Kubectl, namespace: str) -> str:
    """A user whose only right in ``namespace`` is to create and read FineTuneJobs."""
    kubectl("create", "role", "ftj-creator", "-n", namespace, "--verb=create,get,list,watch",
            "--resource=finetunejobs.kubetune.io")  # fmt: skip
    kubectl("create", "rolebinding", "ftj-creator", "-n", namespace, "--role=ftj-creator",
            f"--user={TENANT}")  # fmt: skip
    return TENANT


@pytest.fixture
def references_policy(helm: Callable[..., Any], kubectl: Kubectl) -> Iterator[None]:
    rendered = helm("template", "kt", str(REPO / "charts" / "kubetune"), "-n", "kubetune-system",
                    "-s", "templates/references-policy.yaml")  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    kubectl("apply", "-f", "-", input=rendered.stdout)
    yield
    kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered.stdout)


def test_a_registry_secret_the_creator_may_not_read_is_refused_naming_the_field(
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    registry: LoginRegistry,
    tenant: str,
    references_policy: None,
) -> None:
    registry_secret(kubectl, namespace, registry)
    spec = oci_spec(f"oci://{registry.host}/team/tiny", credentialsSecretRef={"name": "regcred"})
    spec["model"] = {"uri": "org/model"}
    spec["dataset"] = {"uri": "https://datasets.invalid/train.jsonl"}
    spec["output"]["checkpointUri"] = "s3://bucket/checkpoints"
    manifest = json.dumps({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                           "metadata": {"name": "borrowed"}, "spec": spec})  # fmt: skip

    def create(*extra: str) -> Any:
        return kubectl("--as", tenant, "create", "-n", namespace, *extra, "-f", "-",
                       input=manifest, check=False)  # fmt: skip

    # An admission policy takes effect once the apiserver has loaded it (a dry run is admitted
    # like a real request, without side effects).
    wait_for(lambda: create("--dry-run=server").returncode != 0, 60, "the references policy")
    refused = create()
    assert refused.returncode != 0
    assert (
        f"spec.output.registry.credentialsSecretRef: you may not get Secret regcred in namespace "
        f"{namespace}" in refused.stderr
    )
