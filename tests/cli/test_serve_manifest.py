"""`kubetune serve-manifest` against a real apiserver with the real CRDs of KServe and KAITO.

A FineTuneJob's status is written here as the operator writes it on success; the command reads it
through the kubeconfig and prints the manifest, which the apiserver must accept (server-side
apply, dry-run) under KServe's LLMInferenceService and KAITO's Workspace schemas
(hack/serving-crds/fetch.sh brings them at build time) and the core Deployment and Service ones;
and what the manifest loads is the adapter where the status says it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_devtools.pytest_plugin import Kubectl, apply, install_crd, minimal_finetunejob

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DIGEST = "sha256:" + "ab" * 32
REGISTRY = "registry.example.internal:5000"

#: Where each job's adapter ends up: (spec.output, the status's adapter URI).
LOCATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "pvc": ({"uri": "pvc://adapters/support"}, "pvc://adapters/support"),
    # KAITO mounts a whole claim as the adapter's folder.
    "pvc-root": ({"uri": "pvc://support-adapter"}, "pvc://support-adapter"),
    "oci": (
        {
            "uri": f"oci://{REGISTRY}/team/support:v1",
            "checkpointUri": "pvc://work/support",
            "registry": {"credentialsSecretRef": {"name": "regcred"}},
        },
        f"oci://{REGISTRY}/team/support@{DIGEST}",
    ),
    # The image KAITO's puller takes apart.
    "oci-kaito": (
        {
            "uri": f"oci://{REGISTRY}/team/support-kaito:v1",
            "checkpointUri": "pvc://work/support",
            "registry": {"credentialsSecretRef": {"name": "regcred"}, "layout": "kaito"},
        },
        f"oci://{REGISTRY}/team/support-kaito@{DIGEST}",
    ),
    "s3": ({"uri": "s3://models/adapters/support"}, "s3://models/adapters/support"),
}


@pytest.fixture(scope="module")
def serving_crds() -> Path:
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "serving-crds" / "fetch.sh")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"hack/serving-crds/fetch.sh failed:\n{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crds(kubectl: Kubectl, serving_crds: Path) -> None:
    install_crd(kubectl, REPO / "crds" / "finetunejobs.kubetune.io.yaml")
    install_crd(kubectl, serving_crds / "llminferenceservices.serving.kserve.io.yaml")
    install_crd(kubectl, serving_crds / "workspaces.kaito.sh.yaml")


def succeeded_job(kubectl: Kubectl, namespace: str, name: str, where: str) -> str:
    """A FineTuneJob whose adapter went to ``where`` (a LOCATIONS key), Succeeded as the
    operator reports it; the adapter's URI in its status."""
    output, adapter_uri = LOCATIONS[where]
    job = minimal_finetunejob(
        name,
        model={"uri": "meta-llama/Llama-2-7b-hf", "tokenSecretRef": {"name": "hf", "key": "t"}},
        output=output,
        lora={"r": 16},
        runPolicy={"suspend": True},
    )
    apply(kubectl, namespace, job)
    result = {
        "outcome": "Succeeded",
        "reason": "Succeeded",
        "adapter": {"uri": adapter_uri, "sha256": "cd" * 32, "sizeBytes": 4096},
        "baseModel": {"uri": "meta-llama/Llama-2-7b-hf", "revision": "main"},
    }
    kubectl("patch", "ftj", name, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": "Succeeded", "result": result}}))  # fmt: skip
    return adapter_uri


def serve_manifest(
    kubeconfig: Path, namespace: str, name: str, stack: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kubetune"), "serve-manifest", name, "-n", namespace, "--for", stack,
         "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def accepted(kubectl: Kubectl, printed: str) -> list[dict[str, Any]]:
    """The printed objects, once the apiserver accepted them (server-side apply, dry-run)."""
    kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=printed)
    return [doc for doc in yaml.safe_load_all(printed) if doc]


@pytest.mark.parametrize("where", ["pvc", "oci", "s3"])
def test_vllm_deployment_is_accepted_and_loads_the_adapter_from_where_it_is(
    crds: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path, where: str
) -> None:
    name = f"support-{where}"
    adapter_uri = succeeded_job(kubectl, namespace, name, where)
    run = serve_manifest(kubeconfig_path, namespace, name, "vllm")
    assert run.returncode == 0, run.stderr
    deployment, service = accepted(kubectl, run.stdout)
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "meta-llama/Llama-2-7b-hf"
    assert "--enable-lora" in args
    module = json.loads(args[args.index("--lora-modules") + 1])
    assert module["name"] == name
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    if where == "pvc":
        assert volumes["adapter"]["persistentVolumeClaim"]["claimName"] == "adapters"
        assert mounts["adapter"]["mountPath"] == module["path"]
        assert mounts["adapter"]["subPath"] == "support"
    else:
        fetch = pod["initContainers"][0]
        assert adapter_uri.removeprefix("oci://") in fetch["args"] or adapter_uri in (
            fetch.get("args", []) + fetch.get("command", [])
        )
        assert module["path"] in fetch.get("args", []) + fetch.get("command", [])
    if where == "oci":
        assert volumes["registry-auth"]["secret"]["secretName"] == "regcred"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "t"}


@pytest.mark.parametrize("where", ["pvc", "oci", "s3"])
def test_kserve_llminferenceservice_is_accepted_with_the_adapter_under_lora_adapters(
    crds: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path, where: str
) -> None:
    name = f"support-{where}"
    adapter_uri = succeeded_job(kubectl, namespace, name, where)
    run = serve_manifest(kubeconfig_path, namespace, name, "kserve")
    assert run.returncode == 0, run.stderr
    (service,) = accepted(kubectl, run.stdout)
    assert service["kind"] == "LLMInferenceService"
    model = service["spec"]["model"]
    assert model["uri"] == "hf://meta-llama/Llama-2-7b-hf"
    assert model["lora"]["adapters"] == [{"uri": adapter_uri, "name": name}]


@pytest.mark.parametrize("where", ["pvc-root", "oci-kaito"])
def test_kaito_workspace_is_accepted_with_the_adapter_in_inference_adapters(
    crds: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path, where: str
) -> None:
    name = f"support-{where}"
    adapter_uri = succeeded_job(kubectl, namespace, name, where)
    run = serve_manifest(kubeconfig_path, namespace, name, "kaito")
    assert run.returncode == 0, run.stderr
    (workspace,) = accepted(kubectl, run.stdout)
    assert workspace["kind"] == "Workspace"
    assert workspace["inference"]["preset"]["name"] == "meta-llama/Llama-2-7b-hf"
    (adapter,) = workspace["inference"]["adapters"]
    if where == "pvc-root":
        claim = {"claimName": "support-adapter", "readOnly": True}
        assert adapter["source"]["volumeSource"] == {"persistentVolumeClaim": claim}
    else:
        assert adapter["source"]["image"] == adapter_uri.removeprefix("oci://")
        assert adapter["source"]["imagePullSecrets"] == ["regcred"]


@pytest.mark.parametrize(("where", "advice"), [("s3", "oci://"), ("oci", "layout: kaito")])
def test_kaito_refuses_an_adapter_it_cant_pull_and_says_what_to_do(
    crds: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path, where: str, advice: str
) -> None:
    succeeded_job(kubectl, namespace, f"support-{where}", where)
    run = serve_manifest(kubeconfig_path, namespace, f"support-{where}", "kaito")
    assert run.returncode == 2
    assert run.stdout == ""
    assert advice in run.stderr and "--for vllm" in run.stderr


def test_a_job_still_running_has_nothing_to_serve(
    crds: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path
) -> None:
    apply(kubectl, namespace, minimal_finetunejob("running", runPolicy={"suspend": True}))
    run = serve_manifest(kubeconfig_path, namespace, "running", "vllm")
    assert run.returncode == 2
    assert "has no adapter to serve yet" in run.stderr


def test_the_real_schemas_refuse_what_they_do_not_describe(
    crds: None, kubectl: Kubectl, namespace: str, kubeconfig_path: Path
) -> None:
    """The dry-runs above prove something: the same manifests with a field of the wrong type
    are refused by KAITO's and KServe's schemas."""
    succeeded_job(kubectl, namespace, "support-oci", "oci")
    succeeded_job(kubectl, namespace, "support-oci-kaito", "oci-kaito")
    kaito = yaml.safe_load(
        serve_manifest(kubeconfig_path, namespace, "support-oci-kaito", "kaito").stdout
    )
    kaito["inference"]["adapters"][0]["strength"] = 1  # a string in KAITO's schema
    kserve = yaml.safe_load(
        serve_manifest(kubeconfig_path, namespace, "support-oci", "kserve").stdout
    )
    kserve["spec"]["replicas"] = "one"  # an integer in KServe's schema
    for wrong, field in ((kaito, "inference.adapters[0].strength"), (kserve, "spec.replicas")):
        refused = kubectl(
            "apply", "--server-side", "--dry-run=server", "-f", "-",
            input=json.dumps(wrong), check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert field in refused.stderr
