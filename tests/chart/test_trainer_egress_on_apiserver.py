"""The trainer NetworkPolicy of every documented egress example, on the real kube-apiserver.

Each example's values go through the chart (``helm template``) into the operator's settings, the
operator renders a job's children from them, and the NetworkPolicy is created on the apiserver:
an ``except`` outside its ``cidr`` (or any other policy the apiserver refuses) would fail every
job of a cluster configured as the documentation says.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import Render, of_kind, settings_from

from kubetune.api.models import FineTuneJobSpec
from kubetune.operator.render import render as render_children
from kubetune.operator.settings import OperatorSettings
from kubetune_devtools.pytest_plugin import Kubectl, get_json

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def documented_egress_examples() -> dict[str, dict[str, Any]]:
    """Every chart values example in the docs that sets the trainer's egress: ``file#n`` →
    values."""
    examples: dict[str, dict[str, Any]] = {}
    for page in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        for number, block in enumerate(_YAML_BLOCK.findall(page.read_text()), start=1):
            try:
                values = yaml.safe_load(block)
            except yaml.YAMLError:
                continue
            trainer = values.get("trainer") if isinstance(values, dict) else None
            if isinstance(trainer, dict) and (
                "networkPolicy" in trainer or "downloadAllowedCIDRs" in trainer
            ):
                examples[f"{page.name}#{number}"] = values
    return examples


EXAMPLES = documented_egress_examples()


def test_the_docs_have_egress_examples() -> None:
    # The tracking guide's narrowed CIDRs and the install guide's examples at least.
    assert {name.partition("#")[0] for name in EXAMPLES} >= {"tracking.md", "install.md"}


def settings_from_chart(render_chart: Render, values: dict[str, Any] | None,
                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:  # fmt: skip
    args: list[str] = []
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args = ["-f", str(path)]
    # The operator's Deployment (an example may turn kubetune-server on beside it).
    [deployment] = [
        d for d in of_kind(render_chart(*args), "Deployment")
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "server"
    ]  # fmt: skip
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]
           if item["name"].startswith("KUBETUNE_") and "value" in item}  # fmt: skip
    return settings_from(env, monkeypatch)


def policies(settings: OperatorSettings, name: str) -> list[dict[str, Any]]:
    """The NetworkPolicies of a one-pod job and of a two-pod group rendered under
    ``settings``: the namespace's trainer policy (once: both jobs render the same one) and the
    group's own."""
    example = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    found: dict[str, dict[str, Any]] = {}
    for suffix, nodes in (("one", 1), ("group", 2)):
        spec = {**example["spec"], "resources": {**example["spec"]["resources"], "nodes": nodes}}
        spec["training"] = {**spec["training"], "microBatchSize": 8}
        meta = {"name": f"{name}-{suffix}", "namespace": "ns", "uid": "uid-1"}
        objects = render_children(FineTuneJobSpec.model_validate(spec), meta, settings)
        for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
            policy["metadata"].pop("ownerReferences", None)  # no FineTuneJob exists here
            policy["metadata"].pop("namespace", None)
            assert found.setdefault(policy["metadata"]["name"], policy) == policy
    return list(found.values())


@pytest.mark.parametrize("example", [None, *sorted(EXAMPLES)], ids=lambda e: e or "defaults")
def test_a_documented_egress_example_renders_a_policy_the_apiserver_takes(
    render: Render,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    example: str | None,
) -> None:
    settings = settings_from_chart(render, EXAMPLES.get(example or ""), tmp_path, monkeypatch)
    name = re.sub(r"[^a-z0-9]+", "-", (example or "defaults").lower()).strip("-")
    for policy in policies(settings, name):
        applied = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(policy),
                          check=False)  # fmt: skip
        assert applied.returncode == 0, f"{example}: the apiserver refused\n{applied.stderr}"
        stored = get_json(kubectl, "networkpolicy", policy["metadata"]["name"], "-n", namespace)
        assert stored["spec"]["egress"] == policy["spec"]["egress"]
        # Stored as rendered, whole: the operator's check of the shared policy finds it so.
        assert stored["spec"] == policy["spec"]
        # No egress rule without a destination: that would open its ports to every address.
        assert all(rule.get("to") for rule in stored["spec"]["egress"])
