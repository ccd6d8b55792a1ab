"""The FineTuneJob field reference (docs/reference.md), generated from the CRD schema so the
documentation can't drift from what the apiserver accepts."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.crd import build_crd

_HEADER = """# FineTuneJob reference (kubetune.io/v1alpha1)

Generated from the API models by `make crds`; a test fails when it drifts. Every field is also
documented in the cluster: `kubectl explain finetunejob.spec.training`.

Only `model.uri`, `dataset.uri` and `output.uri` are required. Sections marked *immutable*
can't change once the job exists; edit `runPolicy` (e.g. `suspend`) and `scheduling` freely.

Every list, map and string of the spec has a bound, shown as (≤ N): items, keys or characters
(a map's keys are at most 317 characters, 253 for resource names). The apiserver refuses a
value over its bound, naming the field. The spec as a whole may be at most 128 KiB of JSON
(`kubetune validate`, and the operator, which fails a larger one `InvalidSpec`).
"""


def _type_of(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity"
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"list{_bound(node, 'maxItems')} of {_type_of(node.get('items', {}))}"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map{_bound(node, 'maxProperties')} of {_type_of(node['additionalProperties'])}"
    if kind == "string":
        return f"string{_bound(node, 'maxLength')}"
    return kind


def _bound(node: dict[str, Any], key: str) -> str:
    return f" (≤ {node[key]})" if key in node else ""


def _rows(node: dict[str, Any], prefix: str, required: set[str]) -> list[str]:
    rows: list[str] = []
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        default = child.get("default")
        shown = "" if default is None or default == {} else f"`{json.dumps(default)}`"
        notes = []
        if key in required:
            notes.append("**required**")
        if any(
            r.get("rule") == "self == oldSelf" for r in child.get("x-kubernetes-validations", [])
        ):
            notes.append("*immutable*")
        description = " ".join([*notes, str(child.get("description", ""))]).strip()
        rows.append(f"| `{path}` | {_type_of(child)} | {shown} | {description} |")
        target = child.get("items", child) if child.get("type") == "array" else child
        if "properties" in target:
            rows.extend(
                _rows(
                    target,
                    path + ("[]" if target is not child else ""),
                    set(target.get("required", [])),
                )
            )
    return rows


def render_reference() -> str:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    parts = [_HEADER]
    for section in ("spec", "status"):
        parts.append(
            f"\n## {section}\n\n| field | type | default | description |\n|---|---|---|---|"
        )
        node = schema[section]
        parts.append("\n".join(_rows(node, "", set(node.get("required", [])))))
    return "\n".join(parts) + "\n"
