"""FineTuneJob manifests shared by the model tests and the CRD-on-apiserver tests (a module name
of its own: each test folder has a conftest.py)."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.api.bounded import AFFINITY
from kubetune.api.models import MAX_SPEC_BYTES
from kubetune.api.schema_bounds import largest
from kubetune_devtools.pytest_plugin import minimal_finetunejob

MINIMAL: dict[str, Any] = minimal_finetunejob()
HUGE_AFFINITY: dict[str, Any] = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": [f"{i:063d}" for i in range(2_000)]}
                ]}
            ]
        }
    }
}  # fmt: skip
TOO_MANY_ENV: dict[str, Any] = {
    "name": "trainer",
    "env": [{"name": f"VAR_{i}", "value": "x"} for i in range(33)],
}


def with_spec(**changes: Any) -> dict[str, Any]:
    """The minimal manifest with spec sections replaced or merged in."""
    manifest = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        current = manifest["spec"].get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            current.update(value)
        else:
            manifest["spec"][key] = value
    return manifest


def https_mlflow(**fields: Any) -> dict[str, Any]:
    """spec.tracking with an MLflow server over https, ``fields`` (credentials) added."""
    return {
        "mlflow": {"trackingUri": "https://mlflow.example.com", "experimentName": "e", **fields}
    }


# Each invalid manifest, and the words its error must contain: the field and what is allowed.
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "missing model",
        {"spec": {"dataset": {"uri": "x"}, "output": {"uri": "y"}}},
        ["spec.model", "required"],
    ),
    (
        "missing output",
        {"spec": {"model": {"uri": "m"}, "dataset": {"uri": "x"}}},
        ["spec.output", "required"],
    ),
    ("unknown top-level field", with_spec(epochs=3), ["spec.epochs", "unknown field", "training"]),
    (
        "unknown nested field",
        with_spec(lora={"rank": 8}),
        ["spec.lora.rank", "unknown field", "r, alpha"],
    ),
    (
        "bad quantization type",
        with_spec(quantization={"type": "int8"}),
        ["spec.quantization.type", "'nf4'", "'fp4'"],
    ),
    (
        "bad compute dtype",
        with_spec(quantization={"computeDtype": "bf16"}),
        ["spec.quantization.computeDtype", "'bfloat16'"],
    ),
    (
        "fp8 matmuls on without bf16 compute",
        with_spec(quantization={"fp8Matmuls": "on", "computeDtype": "float16"}),
        ["quantization.fp8Matmuls", "computeDtype: bfloat16"],
    ),
    (
        "unknown dataset format",
        with_spec(dataset={"uri": "d.jsonl", "format": "sharegpt"}),
        ["spec.dataset.format", "'messages'", "'alpaca'"],
    ),
    (
        "epochs and maxSteps",
        with_spec(training={"epochs": 1, "maxSteps": 10}),
        ["spec.training", "either training.epochs or training.maxSteps"],
    ),
    ("zero lora alpha", with_spec(lora={"alpha": 0}), ["spec.lora.alpha", "greater than 0"]),
    ("zero rank", with_spec(lora={"r": 0}), ["spec.lora.r", "greater than or equal to 1"]),
    ("dropout of one", with_spec(lora={"dropout": 1.0}), ["spec.lora.dropout", "less than 1"]),
    (
        "negative learning rate",
        with_spec(training={"learningRate": -1e-4}),
        ["spec.training.learningRate", "greater than 0"],
    ),
    (
        "batch not a multiple of micro batch",
        with_spec(training={"batchSize": 10, "microBatchSize": 4}),
        [
            "training.batchSize must be a multiple of training.microBatchSize",
            "(10 is not a multiple of 4)",
        ],
    ),
    (
        "inconsistent accumulation",
        with_spec(training={"batchSize": 16, "microBatchSize": 4, "gradientAccumulationSteps": 2}),
        ["training.microBatchSize (4)", "gradientAccumulationSteps (2)", "training.batchSize (16)"],
    ),
    (
        "unsupported model scheme",
        with_spec(model={"uri": "ftp://host/model"}),
        ["spec.model.uri", "'ftp'", "pvc://"],
    ),
    (
        "pvc uri without claim",
        with_spec(dataset={"uri": "pvc:///train.jsonl"}),
        ["spec.dataset.uri", "pvc://<claim-name>/<path>"],
    ),
    (
        "output to https",
        with_spec(output={"uri": "https://example.org/out"}),
        ["spec.output.uri", "'https'"],
    ),
    (
        "eval split and fraction",
        with_spec(dataset={"uri": "d", "evalSplit": "test", "evalFraction": 0.1}),
        ["spec.dataset", "at most one of dataset.evalSplit, dataset.evalFraction"],
    ),
    (
        "eval fraction and uri",
        with_spec(dataset={"uri": "d", "evalFraction": 0.1, "evalUri": "e"}),
        ["spec.dataset", "and dataset.evalUri"],
    ),
    (
        "eval uri escaping its claim",
        with_spec(dataset={"uri": "d", "evalUri": "pvc://data/../x"}),
        ["spec.dataset.evalUri", "'..'"],
    ),
    (
        "eval fraction too large",
        with_spec(dataset={"uri": "d", "evalFraction": 0.9}),
        ["spec.dataset.evalFraction", "less than or equal to 0.5"],
    ),
    (
        "too many gpus",
        with_spec(resources={"gpus": 17}),
        ["spec.resources.gpus", "less than or equal to 16"],
    ),
    (
        "zero nodes",
        with_spec(resources={"nodes": 0}),
        ["spec.resources.nodes", "greater than or equal to 1"],
    ),
    (
        "batch does not divide over the ranks",
        with_spec(resources={"gpus": 2, "nodes": 3}, training={"batchSize": 16}),
        ["training.batchSize (16) must divide over 6 ranks"],
    ),
    (
        "memory not a quantity",
        with_spec(resources={"memory": "lots"}),
        ["spec.resources.memory", "not a Kubernetes quantity"],
    ),
    (
        "bad toleration operator",
        with_spec(scheduling={"tolerations": [{"key": "k", "operator": "In"}]}),
        ["spec.scheduling.tolerations[0].operator", "'Exists'"],
    ),
    (
        "secret name not a k8s name",
        with_spec(model={"uri": "m", "tokenSecretRef": {"name": "HF Token"}}),
        ["spec.model.tokenSecretRef.name", "pattern"],
    ),
    (
        "hub push without token",
        with_spec(output={"uri": "pvc://a/b", "pushToHub": {"repoId": "me/x"}}),
        ["spec.output.pushToHub.tokenSecretRef", "required"],
    ),
    (
        "queue name too long for a label",
        with_spec(scheduling={"queueName": "q" * 64}),
        ["spec.scheduling.queueName", "not a valid label value"],
    ),
    (
        "gpu resource name with a space",
        with_spec(resources={"gpuResourceName": "nvidia.com/my gpu"}),
        ["spec.resources.gpuResourceName", "not a valid qualified name"],
    ),
    (
        "priority class not a DNS name",
        with_spec(scheduling={"priorityClassName": "High_Priority"}),
        ["spec.scheduling.priorityClassName", "not a valid name"],
    ),
    (
        "infinite lora alpha",
        with_spec(lora={"alpha": float("inf")}),
        ["spec.lora.alpha", "finite number"],
    ),
    (
        "seed beyond 32 bits",
        with_spec(training={"seed": 2**40}),
        ["spec.training.seed", "less than or equal to 4294967295"],
    ),
    (
        "output path leaving its claim",
        with_spec(output={"uri": "pvc://scratch/../../x"}),
        ["spec.output.uri", "must not contain '..' segments"],
    ),
    (
        "dataset uri with a NUL byte",
        with_spec(dataset={"uri": "pvc://data/train\u0000.jsonl"}),
        ["spec.dataset.uri", "control characters or NUL"],
    ),
    (
        "dataset host with a bad port",
        with_spec(dataset={"uri": "https://example.org:abc/d.jsonl"}),
        ["spec.dataset.uri", "invalid port"],
    ),
    ("wrong kind", {**MINIMAL, "kind": "TrainJob"}, ["kind: must be FineTuneJob"]),
    (
        "wrong apiVersion",
        {**MINIMAL, "apiVersion": "kubetune.io/v1"},
        ["apiVersion: must be kubetune.io/v1alpha1"],
    ),
    (
        "tracking uri with credentials",
        with_spec(
            tracking={
                "mlflow": {
                    "trackingUri": "https://bob:hunter2hunter2@mlflow.example.com",
                    "experimentName": "e",
                }
            }
        ),
        ["spec.tracking.mlflow.trackingUri", "credentials"],
    ),
    (
        "tracking username without password",
        with_spec(tracking=https_mlflow(usernameSecretRef={"name": "mlflow-auth", "key": "user"})),
        ["usernameSecretRef and passwordSecretRef together"],
    ),
    (
        "object store key id without the secret key",
        with_spec(objectStore={"accessKeyIdSecretRef": {"name": "s3-creds", "key": "id"}}),
        ["accessKeyIdSecretRef and secretAccessKeySecretRef together"],
    ),
    (
        "object store endpoint with a path",
        with_spec(objectStore={"endpoint": "https://minio.example:9000/bucket"}),
        ["spec.objectStore.endpoint"],
    ),
    (
        # The issue's 1.4 MB affinity in small: one expression with 2,000 values (the memory test
        # in tests/operator sends the whole 20,000).
        "affinity over its bounds",
        with_spec(scheduling={"affinity": HUGE_AFFINITY}),
        ["spec.scheduling.affinity", "matchExpressions[0].values", "at most 8 items"],
    ),
    (
        "pod template over its bounds",
        with_spec(podTemplate={"spec": {"containers": [TOO_MANY_ENV]}}),
        ["spec.podTemplate.spec", "containers[0].env", "at most 32 items"],
    ),
    (
        "pod template string over its bound",
        with_spec(podTemplate={"spec": {"runtimeClassName": "r" * 254}}),
        ["spec.podTemplate.spec", "runtimeClassName", "longer than 253"],
    ),
    (
        "target modules over their bound",
        with_spec(lora={"targetModules": ["q_proj"] * 65}),
        ["spec.lora.targetModules", "at most 64 items"],
    ),
    (
        # Every field within its bound, all together over the whole-spec limit.
        "spec over the whole-spec limit",
        with_spec(scheduling={"affinity": largest(AFFINITY)}),
        [f"more than {MAX_SPEC_BYTES}", "spec.scheduling"],
    ),
]


#: The cases the CRD itself rejects on the real apiserver (schema, CEL, strict field validation),
#: and the field its message must name. The others (URI schemes, accumulation arithmetic,
#: quantity syntax) pass the schema and are caught by the same models in the operator, which
#: fails the job with reason InvalidSpec naming the field.
APISERVER_FIELD: dict[str, str] = {
    "missing model": "spec.model",
    "missing output": "spec.output",
    "unknown top-level field": "spec.epochs",
    "unknown nested field": "spec.lora.rank",
    "bad quantization type": "spec.quantization.type",
    "bad compute dtype": "spec.quantization.computeDtype",
    "fp8 matmuls on without bf16 compute": "quantization.fp8Matmuls: on needs",
    "unknown dataset format": "spec.dataset.format",
    "epochs and maxSteps": "either training.epochs or training.maxSteps",
    "zero lora alpha": "spec.lora.alpha",
    "zero rank": "spec.lora.r",
    "dropout of one": "spec.lora.dropout",
    "negative learning rate": "spec.training.learningRate",
    "batch not a multiple of micro batch": "training.batchSize must be a multiple",
    "eval split and fraction": "at most one of dataset.evalSplit, dataset.evalFraction",
    "eval fraction and uri": "at most one of dataset.evalSplit, dataset.evalFraction",
    "eval uri escaping its claim": "spec.dataset.evalUri",
    "eval fraction too large": "spec.dataset.evalFraction",
    "too many gpus": "spec.resources.gpus",
    "zero nodes": "spec.resources.nodes",
    "bad toleration operator": "spec.scheduling.tolerations[0].operator",
    "secret name not a k8s name": "spec.model.tokenSecretRef.name",
    "hub push without token": "spec.output.pushToHub.tokenSecretRef",
    "queue name too long for a label": "spec.scheduling.queueName",
    "gpu resource name with a space": "spec.resources.gpuResourceName",
    "priority class not a DNS name": "spec.scheduling.priorityClassName",
    "seed beyond 32 bits": "spec.training.seed",
    "output path leaving its claim": "spec.output.uri",
    "tracking uri with credentials": "tracking.mlflow.trackingUri",
    "tracking username without password": "usernameSecretRef and passwordSecretRef together",
    "affinity over its bounds": "matchExpressions[0].values",
    "pod template over its bounds": "containers[0].env",
    "pod template string over its bound": "runtimeClassName",
    "target modules over their bound": "spec.lora.targetModules",
}
