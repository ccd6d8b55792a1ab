"""The generated CRD on the real kube-apiserver: what `kubectl apply` tells a user who gets a
field wrong, the defaults it fills in, and the fields it refuses to change."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cases import APISERVER_FIELD, INVALID, MINIMAL, https_mlflow, with_spec

from kubetune.api.errors import SpecError
from kubetune.api.manifest import load_finetunejob
from kubetune.api.models import _CHECKPOINT_RULE as CHECKPOINT_RULE
from kubetune.api.models import _QUALIFIED_HINT as QUALIFIED_HINT
from kubetune_devtools.pytest_plugin import Kubectl, get_json, install_crd, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
CASES = {name: manifest for name, manifest, _ in INVALID}


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> None:
    install_crd(kubectl, CRD)


def manifest_named(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    full = manifest if "apiVersion" in manifest else {**MINIMAL, **manifest}
    return {**full, "metadata": {"name": name}}


def kubetune_validate(manifest: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    kubetune = Path(sys.executable).with_name("kubetune")
    return subprocess.run([str(kubetune), "validate", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize("case", sorted(APISERVER_FIELD))
def test_apiserver_and_kubetune_validate_reject_the_invalid_manifest_naming_the_field(
    crd: None, kubectl: Kubectl, namespace: str, tmp_path: Path, case: str
) -> None:
    manifest = manifest_named(CASES[case], "invalid")
    result = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                     input=json.dumps(manifest), check=False)  # fmt: skip
    assert result.returncode != 0, f"{case}: accepted by the apiserver"
    assert APISERVER_FIELD[case] in result.stderr, result.stderr

    offline = kubetune_validate(manifest, tmp_path)
    assert offline.returncode == 2, offline.stdout
    assert APISERVER_FIELD[case] in offline.stderr, offline.stderr


@pytest.mark.parametrize("case", sorted(set(CASES) - set(APISERVER_FIELD)))
def test_what_the_schema_lets_through_kubetune_validate_refuses_like_the_operator(
    tmp_path: Path, case: str
) -> None:
    """These reach the operator, which fails the job InvalidSpec with the models' message; the
    operator test of InvalidSpec shows that message on the job."""
    offline = kubetune_validate(manifest_named(CASES[case], "invalid"), tmp_path)
    assert offline.returncode == 2, offline.stdout
    expected = next(words for name, _, words in INVALID if name == case)
    for words in expected:
        assert words in offline.stderr, offline.stderr


def test_kubetune_validate_accepts_every_example_job() -> None:
    jobs = [
        p
        for p in sorted((REPO / "examples").glob("*.yaml"))
        if "kind: FineTuneJob" in p.read_text()
    ]
    kubetune = Path(sys.executable).with_name("kubetune")
    result = subprocess.run([str(kubetune), "validate", *map(str, jobs)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" is valid") == len(jobs) >= 4


def test_seed_example_is_accepted_and_defaulted(
    crd: None, kubectl: Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "llama2-qlora.yaml"))
    spec = get_json(kubectl, "ftj", "llama2-support", "-n", namespace)["spec"]
    assert spec["quantization"] == {
        "type": "nf4",
        "doubleQuant": True,
        "computeDtype": "bfloat16",
        "fp8Matmuls": "auto",
    }
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


# --- the CEL rules and the pydantic rules refuse the same manifests -----------------------------


def nested(path: str, value: Any) -> dict[str, Any]:
    """``scheduling.nodeSelector`` = v → {"scheduling": {"nodeSelector": v}}, for with_spec."""
    head, *rest = path.split(".")
    for key in reversed(rest):
        value = {key: value}
    return {head: value}


def cel_rules(node: Any) -> list[dict[str, str]]:
    """Every x-kubernetes-validations rule in a schema, but the immutability ones."""
    found: list[dict[str, str]] = []
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            if rule["rule"] != "self == oldSelf":
                found.append(rule)
        for value in node.values():
            found.extend(cel_rules(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(cel_rules(value))
    return found


#: For each CEL rule's message: a manifest that breaks it, a close one that keeps it, and what
#: the models' offline message says. Both layers must refuse the first and accept the second.
OCI_OUTPUT = "oci://registry.example.com/team/adapter:v1"
#: The URI rules every optional URI field shares: (rule, a URI it refuses, one it keeps, what the
#: models say of the refused one).
PVC_URI_RULES = (
    ("must not contain '..' segments", "pvc://claim/x/../../y", "pvc://claim/x/..y",
     "must not contain '..'"),
    ("must be of the form pvc://<claim-name>/<path>", "pvc://Claim_1/x", "pvc://claim-1/x",
     "is not of the form pvc://"),
)  # fmt: skip
#: The optional URI fields with those rules: (the rules' name, the field, a spec with that URI).
PVC_URI_FIELDS: tuple[tuple[str, str, Callable[[str], dict[str, Any]]], ...] = (
    ("dataset.evalUri", "dataset.evalUri",
     lambda uri: with_spec(dataset={"uri": "pvc://claim/d", "evalUri": uri})),
    ("output.checkpointUri", "output.checkpointUri",
     lambda uri: with_spec(output={"uri": OCI_OUTPUT, "checkpointUri": uri})),
)  # fmt: skip


CEL_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "dataset.format must be one method.type trains on (sft: text, messages, prompt-completion, "
    "alpaca; dpo: preference; kto: preference, unpaired-preference) or auto": (
        with_spec(method={"type": "dpo"}, dataset={"uri": "pvc://data/d", "format": "text"}),
        with_spec(method={"type": "dpo"}, dataset={"uri": "pvc://data/d", "format": "preference"}),
        "spec: dataset.format must be one method.type trains on",
    ),
    "quantization.fp8Matmuls: on needs quantization.computeDtype: bfloat16": (
        with_spec(quantization={"fp8Matmuls": "on", "computeDtype": "float16"}),
        with_spec(quantization={"fp8Matmuls": "on"}),
        "spec.quantization: quantization.fp8Matmuls: on needs quantization.computeDtype: bfloat16",
    ),
    "method.dpo is for method.type dpo": (
        with_spec(method={"type": "kto", "dpo": {"beta": 0.2}}),
        with_spec(method={"type": "dpo", "dpo": {"beta": 0.2}}),
        "spec.method: method.dpo is for method.type dpo",
    ),
    "method.kto is for method.type kto": (
        with_spec(method={"kto": {"beta": 0.2}}),
        with_spec(method={"type": "kto", "kto": {"beta": 0.2}}),
        "spec.method: method.kto is for method.type kto",
    ),
    "method.dpo.lossType exo_pair needs method.dpo.labelSmoothing > 0": (
        with_spec(method={"type": "dpo", "dpo": {"lossType": "exo_pair"}}),
        with_spec(method={"type": "dpo", "dpo": {"lossType": "exo_pair", "labelSmoothing": 0.001}}),
        "spec.method.dpo: method.dpo.lossType exo_pair needs method.dpo.labelSmoothing > 0",
    ),
    "tracking.mlflow.trackingUri must be an http(s) URL without credentials, query or fragment": (
        with_spec(
            tracking={
                "mlflow": {"trackingUri": "https://u:p@mlflow.example.com", "experimentName": "e"}
            }
        ),
        with_spec(
            tracking={
                "mlflow": {"trackingUri": "https://mlflow.example.com/team", "experimentName": "e"}
            }
        ),
        "spec.tracking.mlflow.trackingUri: tracking.mlflow.trackingUri must not carry credentials",
    ),
    "set objectStore.accessKeyIdSecretRef and secretAccessKeySecretRef together": (
        with_spec(objectStore={"secretAccessKeySecretRef": {"name": "s3", "key": "secret"}}),
        with_spec(
            objectStore={
                "accessKeyIdSecretRef": {"name": "s3", "key": "id"},
                "secretAccessKeySecretRef": {"name": "s3", "key": "secret"},
            }
        ),
        "spec.objectStore: set objectStore.accessKeyIdSecretRef and secretAccessKeySecretRef",
    ),
    "set tracking.mlflow.usernameSecretRef and passwordSecretRef together": (
        with_spec(tracking=https_mlflow(usernameSecretRef={"name": "s", "key": "u"})),
        with_spec(
            tracking=https_mlflow(
                usernameSecretRef={"name": "s", "key": "u"},
                passwordSecretRef={"name": "s", "key": "p"},
            )
        ),
        "spec.tracking.mlflow: set tracking.mlflow.usernameSecretRef and passwordSecretRef",
    ),
    "set at most one of dataset.evalSplit, dataset.evalFraction and dataset.evalUri": (
        with_spec(dataset={"uri": "pvc://data/d", "evalSplit": "test", "evalUri": "pvc://d/e"}),
        with_spec(dataset={"uri": "pvc://data/d", "evalUri": "pvc://d/e"}),
        "spec.dataset: set at most one of dataset.evalSplit, dataset.evalFraction and "
        "dataset.evalUri",
    ),
    "set either training.epochs or training.maxSteps, not both": (
        with_spec(training={"epochs": 1, "maxSteps": 10}),
        with_spec(training={"maxSteps": 10}),
        "spec.training: set either training.epochs or training.maxSteps, not both",
    ),
    "training.batchSize must be a multiple of training.microBatchSize": (
        with_spec(training={"batchSize": 10, "microBatchSize": 4}),
        with_spec(training={"batchSize": 12, "microBatchSize": 4}),
        "spec.training: training.batchSize must be a multiple of training.microBatchSize",
    ),
    **{
        f"{what} URI must not contain '..' segments": (
            with_spec(**{what: {"uri": f"pvc://claim/dir/../../{what}"}}),
            with_spec(**{what: {"uri": f"pvc://claim/dir/..{what}"}}),
            f"spec.{what}.uri: {what} URI 'pvc://claim/dir/../../{what}' must not contain '..'",
        )
        for what in ("model", "dataset", "output")
    },
    **{
        f"{what} URI must be of the form pvc://<claim-name>/<path>": (
            with_spec(**{what: {"uri": f"pvc://Claim_1/{what}"}}),
            with_spec(**{what: {"uri": f"pvc://claim-1/{what}"}}),
            f"spec.{what}.uri: {what} URI 'pvc://Claim_1/{what}' is not of the form pvc://",
        )
        for what in ("model", "dataset", "output")
    },
    **{
        f"{what} URI {rule}": (
            spec_with(broken),
            spec_with(kept),
            f"spec.{field}: {what} URI {broken!r} {offline}",
        )
        for what, field, spec_with in PVC_URI_FIELDS
        for rule, broken, kept, offline in PVC_URI_RULES
    },
    **{
        f"model.adapter URI {rule}": (
            with_spec(model={"uri": "org/model", "adapter": {"uri": broken}}),
            with_spec(model={"uri": "org/model", "adapter": {"uri": kept}}),
            f"spec.model.adapter.uri: model.adapter URI {broken!r} {offline}",
        )
        for rule, broken, kept, offline in (
            *PVC_URI_RULES,
            (
                "must be of the form oci://<registry>[:<port>]/<repository>[:<tag>|@sha256:<digest>] "
                "with a lowercase repository",
                "oci://registry.example.com/team/a@sha256:1234",
                "oci://registry.example.com/team/a@sha256:" + "0" * 64,
                "is not of the form oci://",
            ),
        )
    },
    "output URI must be of the form oci://<registry>[:<port>]/<repository>[:<tag>] with a "
    "lowercase repository": (
        with_spec(
            output={"uri": "oci://registry.example.com/Adapters/X", "checkpointUri": "pvc://c/x"}
        ),
        with_spec(
            output={"uri": "oci://registry.example.com/adapters/x", "checkpointUri": "pvc://c/x"}
        ),
        "spec.output.uri: output URI 'oci://registry.example.com/Adapters/X' is not of the form oci://",
    ),
    "output.registry applies only to an oci:// output.uri": (
        with_spec(output={"uri": "pvc://adapters/x", "registry": {"plainHttp": True}}),
        with_spec(
            output={
                "uri": OCI_OUTPUT,
                "checkpointUri": "pvc://c/x",
                "registry": {"plainHttp": True},
            }
        ),
        "spec.output: output.registry applies only to an oci:// output.uri",
    ),
    CHECKPOINT_RULE: (
        with_spec(output={"uri": OCI_OUTPUT}),
        with_spec(output={"uri": OCI_OUTPUT, "checkpointUri": "s3://bucket/checkpoints"}),
        "spec.output: output.checkpointUri is required with an oci:// output.uri",
    ),
    "a toleration with operator Exists takes no value": (
        with_spec(scheduling={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
        with_spec(scheduling={"tolerations": [{"key": "k", "operator": "Exists"}]}),
        "spec.scheduling.tolerations[0]: a toleration with operator Exists takes no value",
    ),
    "tolerationSeconds needs effect NoExecute": (
        with_spec(scheduling={"tolerations": [{"key": "k", "tolerationSeconds": 5}]}),
        with_spec(
            scheduling={
                "tolerations": [{"key": "k", "tolerationSeconds": 5, "effect": "NoExecute"}]
            }
        ),
        "spec.scheduling.tolerations[0]: tolerationSeconds needs effect NoExecute",
    ),
    **{
        f"{field} keys must be qualified names ({QUALIFIED_HINT})": (
            with_spec(**nested(field, {"team a/b c": "x"})),
            with_spec(**nested(field, {"example.com/team-a": "x"})),
            f"spec.{field}.team a/b c[key]: 'team a/b c' is not a valid qualified name",
        )
        for field in (
            "scheduling.nodeSelector",
            "podTemplate.metadata.labels",
            "podTemplate.metadata.annotations",
        )
    },
    # Maps inside the bounded Kubernetes shapes (api/bounded.py): the schema bounds their size,
    # CEL the length of their keys.
    "keys may not be longer than 317 characters": (
        with_spec(podTemplate={"spec": {"nodeSelector": {"k" * 318: "v"}}}),
        with_spec(podTemplate={"spec": {"nodeSelector": {"k" * 317: "v"}}}),
        "spec.podTemplate.spec: nodeSelector: keys may not be longer than 317",
    ),
    "keys may not be longer than 253 characters": (
        with_spec(
            podTemplate={
                "spec": {
                    "containers": [{"name": "trainer", "resources": {"limits": {"r" * 254: "1"}}}]
                }
            }
        ),
        with_spec(
            podTemplate={
                "spec": {
                    "containers": [{"name": "trainer", "resources": {"limits": {"r" * 253: "1"}}}]
                }
            }
        ),
        "spec.podTemplate.spec: containers[0].resources.limits: keys may not be longer than 253",
    ),
}


def test_every_cel_rule_has_an_agreement_case() -> None:
    crd = yaml.safe_load(CRD.read_text())
    messages = {rule["message"] for rule in cel_rules(crd)}
    assert messages == set(CEL_CASES), "add a CEL_CASES entry for each new CEL rule"


@pytest.mark.parametrize("message", sorted(CEL_CASES))
def test_cel_and_the_models_refuse_the_same_manifest(
    crd: None, kubectl: Kubectl, namespace: str, message: str
) -> None:
    broken, kept, offline_message = CEL_CASES[message]

    def apiserver(manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                       input=json.dumps(manifest_named(manifest, "cel")), check=False)  # fmt: skip

    refused = apiserver(broken)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    with pytest.raises(SpecError) as offline:
        load_finetunejob(broken)
    assert any(p.startswith(offline_message) for p in offline.value.problems), (
        offline.value.problems
    )

    accepted = apiserver(kept)
    assert accepted.returncode == 0, accepted.stderr
    load_finetunejob(kept)
