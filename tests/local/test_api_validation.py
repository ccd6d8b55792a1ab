"""The real apiserver enforces a CRD's structural schema."""

from __future__ import annotations

import json

import pytest

from kubetune_devtools.pytest_plugin import Kubectl

pytestmark = pytest.mark.integration


def _crd(group: str) -> dict[str, object]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def test_custom_resource_violating_the_schema_is_rejected(kubectl: Kubectl, namespace: str) -> None:
    group = f"{namespace}.kubetune.test"
    kubectl("apply", "-f", "-", input=json.dumps(_crd(group)))
    try:
        kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")

        def widget(size: object) -> str:
            return json.dumps(
                {
                    "apiVersion": f"{group}/v1",
                    "kind": "Widget",
                    "metadata": {"name": f"w{size}"},
                    "spec": {"size": size},
                }
            )

        invalid = kubectl("apply", "-n", namespace, "-f", "-", input=widget(0), check=False)
        assert invalid.returncode != 0
        assert "spec.size" in invalid.stderr
        assert "should be greater than or equal to 1" in invalid.stderr

        kubectl("apply", "-n", namespace, "-f", "-", input=widget(3))
        assert (
            kubectl("get", "widget", "w3", "-n", namespace, "-o", "jsonpath={.spec.size}").stdout
            == "3"
        )
    finally:
        kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)
