"""The generated CRD on the real kube-apiserver: what `kubectl apply` tells a user who gets a
field wrong, the defaults it fills in, and the fields it refuses to change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cases import APISERVER_FIELD, INVALID, MINIMAL

from kubetune_devtools.pytest_plugin import Kubectl, get_json, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
CASES = {name: manifest for name, manifest, _ in INVALID}


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")


def manifest_named(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    full = manifest if "apiVersion" in manifest else {**MINIMAL, **manifest}
    return {**full, "metadata": {"name": name}}


@pytest.mark.parametrize("case", sorted(APISERVER_FIELD))
def test_apiserver_rejects_the_invalid_manifest_naming_the_field(
    crd: None, kubectl: Kubectl, namespace: str, case: str
) -> None:
    manifest = manifest_named(CASES[case], "invalid")
    result = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                     input=json.dumps(manifest), check=False)  # fmt: skip
    assert result.returncode != 0, f"{case}: accepted by the apiserver"
    assert APISERVER_FIELD[case] in result.stderr, result.stderr


def test_seed_example_is_accepted_and_defaulted(
    crd: None, kubectl: Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "llama2-qlora.yaml"))
    spec = get_json(kubectl, "ftj", "llama2-support", "-n", namespace)["spec"]
    assert spec["quantization"] == {"type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}
    assert spec["training"]["learningRate"] == 5.0e-4
    assert spec["training"]["packing"] is True
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    explained = kubectl("explain", "finetunejob.spec.training.batchSize").stdout
    assert "Effective batch size" in explained


def test_fixed_fields_refuse_changes_and_run_policy_accepts_them(
    crd: None, kubectl: Kubectl, namespace: str
) -> None:
    kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest_named(MINIMAL, "fixed"))
    )
    wait_for(lambda: kubectl("get", "ftj", "fixed", "-n", namespace, check=False).returncode == 0,
             30, "the FineTuneJob")  # fmt: skip
    changed = kubectl("patch", "ftj", "fixed", "-n", namespace, "--type=merge",
                      "-p", '{"spec": {"model": {"uri": "other/model"}}}', check=False)  # fmt: skip
    assert changed.returncode != 0
    assert "spec.model is immutable once the job exists" in changed.stderr
    suspended = kubectl("patch", "ftj", "fixed", "-n", namespace, "--type=merge",
                        "-p", '{"spec": {"runPolicy": {"suspend": true}}}', check=False)  # fmt: skip
    assert suspended.returncode == 0, suspended.stderr
