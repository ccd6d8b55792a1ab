"""The committed CRD is exactly what the generator writes from the API models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.api.crd import CRD_FILENAME, build_crd, render_crd

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


def test_schema_is_structural_and_prunes_nothing_silently() -> None:
    version = build_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema["properties"]["spec"]):
        assert "$ref" not in node and "title" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path.endswith(("affinity", "podTemplate.properties.spec")), path


def test_printer_columns_and_names() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"]
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase", "Progress", "Loss", "Model", "Steps", "Est-Seconds", "Est-GiB", "Ranks", "Age",
        "Adapter",
    ]  # fmt: skip
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
