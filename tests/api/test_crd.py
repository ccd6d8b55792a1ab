"""The committed CRD is exactly what the generator writes from the API models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.crd import CRD_FILENAME, build_crd, render_crd
from kubetune.api.models import MAX_SPEC_BYTES
from kubetune.api.schema_bounds import max_characters

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_models() -> None:
    committed = (ROOT / "crds" / CRD_FILENAME).read_text()
    assert committed == render_crd(), "crds/ drifted from api/: run `make crds` and commit"


def test_chart_crd_is_byte_identical_to_crds() -> None:
    chart_copy = ROOT / "charts" / "kubetune" / "crds" / CRD_FILENAME
    assert chart_copy.read_bytes() == (ROOT / "crds" / CRD_FILENAME).read_bytes()


def _walk(node: object, path: str = "") -> list[tuple[str, dict[str, object]]]:
    found: list[tuple[str, dict[str, object]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, child in node.items():
            found.extend(_walk(child, f"{path}.{key}"))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found.extend(_walk(child, f"{path}[{index}]"))
    return found


def _spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(schema["properties"]["spec"])


def test_schema_is_structural_and_free_form_nowhere() -> None:
    for path, node in _walk(_spec_schema()):
        assert "$ref" not in node and "title" not in node, path
        # A free-form field has no bound the apiserver can check (and CEL can't see into it).
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not any(str(key).startswith("x-kubetune-") for key in node), path


def _unbounded(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if kind == "string" or node.get("x-kubernetes-int-or-string"):
        return "maxLength" not in node and "enum" not in node
    if kind == "array":
        return "maxItems" not in node
    if kind == "object" and "additionalProperties" in node:
        rules = node.get("x-kubernetes-validations", [])
        keys = [r for r in rules if "size(k) <=" in r["rule"]]  # a key's length: only CEL says it
        return "maxProperties" not in node or not keys
    return False


def test_every_list_map_and_string_of_the_spec_has_a_size_bound() -> None:
    # int-or-string's two anyOf branches are bounded on the node itself.
    unbounded = [p for p, node in _walk(_spec_schema()) if ".anyOf[" not in p and _unbounded(node)]
    assert unbounded == []


def test_the_largest_spec_the_apiserver_admits_is_bounded() -> None:
    """The sum of every bound: what one tenant's object may cost at most (the operator's cache
    holds only the few fields it reconciles on, tests/operator's memory test)."""
    largest = max_characters(_spec_schema())

    assert largest < 800_000
    assert largest > MAX_SPEC_BYTES  # the models' whole-spec limit is the tighter one


def test_printer_columns_and_names() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"]
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase", "Progress", "Loss", "Model", "Steps", "Est-Seconds", "Est-GiB", "Ranks", "Method",
        "Reward-Acc", "Age", "Adapter",
    ]  # fmt: skip
    assert columns["Method"]["priority"] == columns["Reward-Acc"]["priority"] == 1
    assert columns["Adapter"]["priority"] == columns["Ranks"]["priority"] == 1
    assert columns["Est-Seconds"]["priority"] == columns["Est-GiB"]["priority"] == 1
    assert "priority" not in columns["Steps"]
    assert columns["Steps"]["jsonPath"] == ".status.estimate.steps"
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_immutable_fields_carry_cel_rules() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for field in ("model", "dataset", "output", "quantization", "lora", "training"):
        rules = [r["rule"] for r in spec["properties"][field].get("x-kubernetes-validations", [])]
        assert "self == oldSelf" in rules, field
    training_rules = [r["rule"] for r in spec["properties"]["training"]["x-kubernetes-validations"]]
    assert any("maxSteps" in r for r in training_rules)


def test_crd_yaml_parses_as_one_document() -> None:
    documents = list(yaml.safe_load_all((ROOT / "crds" / CRD_FILENAME).read_text()))
    assert [d["kind"] for d in documents if d] == ["CustomResourceDefinition"]


def test_field_reference_is_current() -> None:
    from kubetune.api.reference import render_reference

    assert (ROOT / "docs" / "reference.md").read_text() == render_reference(), (
        "docs/reference.md drifted from api/: run `make crds` and commit"
    )
