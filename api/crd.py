"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

``kubetune crd`` (or ``python -m kubetune.api.crd``) prints it; ``kubetune crd --write`` updates
``crds/`` (and ``--reference`` the field reference, ``kubetune.api.reference``, built from it).
A test fails when the committed YAML drifts from what this writes.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.bounded import SHAPE
from kubetune.api.models import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILENAME = f"{CRD_NAME}.yaml"
_RULES = "x-kubernetes-validations"

# Keys of a JSON schema that a Kubernetes structural schema keeps as they are.
_KEPT = {
    "type", "description", "default", "enum", "format", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "required", "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}  # fmt: skip


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        rules = target.get(_RULES, []) + node.get(_RULES, [])
        if rules:
            merged[_RULES] = rules
        return _structural(merged, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        merged = {**branches[0], **rest}
        rules = branches[0].get(_RULES, []) + rest.get(_RULES, [])
        if rules:
            merged[_RULES] = rules
        return _structural(merged, defs)
    if "const" in node:
        node = {**node, "enum": [node["const"]], "type": "string"}
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT}
    # JSON Schema 2020 writes exclusive bounds as numbers, OpenAPI v3.0 as flags on min/max.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(flag), (int, float)) and not isinstance(out[flag], bool):
            out[bound] = out[flag]
            out[flag] = True
    if out.get("default", 0) is None:
        del out["default"]
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = node["anyOf"]
    if "properties" in node:
        required = set(node.get("required", []))
        props: dict[str, Any] = {}
        for key, child in node["properties"].items():
            converted = _structural(child, defs)
            # An omitted section whose fields all have defaults defaults to {} so that the
            # apiserver fills in those fields: `kubectl get -o yaml` shows what will run.
            if (
                key not in required
                and converted.get("type") == "object"
                and "properties" in converted
                and not converted.get("required")
                and "default" not in converted
                and "anyOf" not in child  # optional sections (X | None) stay absent
                and not child.get(SHAPE)  # a Kubernetes shape: what isn't given stays absent
            ):
                converted["default"] = {}
            props[key] = converted
        out["properties"] = props
        out["type"] = "object"
    if node.get("type") == "object" and len(node.get("patternProperties", {})) == 1:
        # A map whose keys have a syntax: the values' schema here, the keys' rule in CEL.
        (values,) = node["patternProperties"].values()
        node = {**node, "additionalProperties": values}
    if node.get("type") == "object" and "additionalProperties" in node:
        extra = node["additionalProperties"]
        if isinstance(extra, dict):
            out["additionalProperties"] = _structural(extra, defs)
    if "items" in node:
        out["items"] = _structural(node["items"], defs)
    if not out.get("required"):
        out.pop("required", None)
    return out


def _schema_for(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def _column(
    name: str, kind: str, path: str, description: str | None = None, *, wide: bool = False
) -> dict[str, Any]:
    """One printer column (``wide``: only in ``kubectl get -o wide``)."""
    column: dict[str, Any] = {"name": name, "type": kind}
    if wide:
        column["priority"] = 1
    column["jsonPath"] = path
    if description is not None:
        column["description"] = description
    return column


#: What ``kubectl get finetunejobs`` shows.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    _column("Phase", "string", ".status.phase"),
    _column("Progress", "string", ".status.progress.percent", "Percent of training steps done."),
    _column("Loss", "number", ".status.progress.loss"),
    _column("Model", "string", ".spec.model.uri"),
    _column(
        "Steps", "integer", ".status.estimate.steps",
        "Optimizer steps the Validating phase estimated.",
    ),
    _column(
        "Est-Seconds", "number", ".status.estimate.seconds",
        "Estimated training seconds on validation.gpuKind.", wide=True,
    ),
    _column(
        "Est-GiB", "number", ".status.estimate.peakGiB", "Estimated peak GPU memory (GiB).",
        wide=True,
    ),
    _column(
        "Ranks", "integer", ".status.worldSize", "Training ranks (GPUs per pod x pods).",
        wide=True,
    ),
    _column("Method", "string", ".spec.method.type", "sft, dpo or kto.", wide=True),
    _column(
        "Reward-Acc", "number", ".status.progress.rewardAccuracy",
        "Preference tuning: the latest reward accuracy.", wide=True,
    ),
    _column("Age", "date", ".metadata.creationTimestamp"),
    _column("Adapter", "string", ".status.result.adapter.uri", wide=True),
]  # fmt: skip


def build_crd() -> dict[str, Any]:
    spec_schema = _schema_for(FineTuneJobSpec)
    status_schema = _schema_for(FineTuneJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["kubetune", "ml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A QLoRA fine-tuning run of a language model.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    return "---\n" + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def default_crd_path() -> Path:
    return Path("crds") / CRD_FILENAME


def write_crd(directory: str | Path) -> Path:
    """Write the CRD into ``directory`` (``crds/``); its path."""
    path = Path(directory) / CRD_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_crd())
    return path


if __name__ == "__main__":
    sys.stdout.write(render_crd())
