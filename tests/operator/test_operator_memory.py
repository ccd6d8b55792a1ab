"""One tenant can't take the shared operator down with large specs, against the real apiserver.

The issue's attack: a 1.4 MB ``scheduling.affinity`` cost ~24 MiB of the operator's cache, so
~20 such FineTuneJobs OOM-killed both replicas (512 MiB limit), again on every restart's first
list. Now the apiserver refuses it naming the field; what it admits at most (every list, map and
string of the spec at its bound) is a few hundred KiB, of which the operator's cache keeps a few
hundred bytes. The operator starts after the tenant's fifty largest jobs exist (its first list
reads them all), and its peak RSS (``VmHWM``) stays under the chart's memory limit while another
tenant's job runs to Succeeded.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operatorkit import CRD, REPO, OperatorProcess, started
from test_operator_integration import apply, finetunejob, sleeper_spec, wait_phase

from kubetune.api.bounded import AFFINITY, POD_SPEC
from kubetune.api.schema_bounds import largest
from kubetune_devtools.pytest_plugin import Kubectl, install_crd, temporary_namespace, wait_for

pytestmark = pytest.mark.integration

TENANT_JOBS = 50
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def chart_memory_limit() -> int:
    """The operator container's memory limit in the chart's values, in bytes."""
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    limit = str(values["resources"]["limits"]["memory"])
    return int(limit[:-2]) * _UNITS[limit[-2:]]


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def qualified_key(index: int) -> str:
    """A label key of the longest form: a 253-character DNS prefix, '/', a 63-character name."""
    prefix = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    return f"{prefix}/{index:0>63d}"


def largest_spec() -> dict[str, Any]:
    """A spec with every list, map and string the schema bounds at its bound (where the models
    would refuse the whole as over their limit, the apiserver still admits it)."""
    return {
        "model": {"uri": "org/model"},
        "dataset": {"uri": "https://datasets.invalid/train.jsonl", "chatTemplate": "t" * 16384},
        "output": {"uri": "s3://bucket/adapter"},
        "lora": {"targetModules": [f"{i:0>256d}" for i in range(64)]},
        "scheduling": {"affinity": largest(AFFINITY), "queueName": "q" * 63},
        "podTemplate": {
            "metadata": {
                "labels": {qualified_key(i): "v" * 63 for i in range(64)},
                "annotations": {qualified_key(i): "v" * 1024 for i in range(16)},
            },
            "spec": largest(POD_SPEC),
        },
        "evaluation": {"prompts": ["p" * 2048] * 16},
    }


def issue_affinity() -> dict[str, Any]:
    """The issue's 1.4 MB affinity: one node-selector expression with 20,000 values."""
    values = [f"zone-{i:0>58d}" for i in range(20_000)]
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": values}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [term]}}}  # fmt: skip


@pytest.fixture
def tenant(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    yield from temporary_namespace(kubectl, f"{namespace[:50]}-tenant")


def test_fifty_specs_at_the_admitted_maximum_keep_the_operator_under_its_memory_limit(
    kubectl: Kubectl, kubeconfig_path: Path, namespace: str, tenant: str, tmp_path: Path
) -> None:
    install_crd(kubectl, CRD)
    base = largest_spec()

    # What the issue's tenant sent is refused at the door, naming the field.
    huge = copy.deepcopy(base)
    huge["scheduling"]["affinity"] = issue_affinity()
    refused = kubectl("create", "-n", tenant, "-f", "-", check=False, timeout=120,
                      input=json.dumps(finetunejob("huge", huge)))  # fmt: skip
    assert refused.returncode != 0
    assert "spec.scheduling.affinity.nodeAffinity" in refused.stderr, refused.stderr[-2000:]

    # What the apiserver admits at most, fifty times.
    items = [finetunejob(f"large-{i}", base) for i in range(TENANT_JOBS)]
    size = len(json.dumps(items[0]))
    kubectl("create", "-n", tenant, "-f", "-", timeout=600,
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))  # fmt: skip

    process = OperatorProcess(
        kubeconfig_path,
        tmp_path / "log",
        ["--namespace", tenant, "--namespace", namespace],
        {"KUBETUNE_LEADER_ELECTION": "false"},
    )
    operator = started(process)
    next(operator)
    try:
        # Another tenant's job runs to the end meanwhile.
        apply(kubectl, namespace, finetunejob("victim", sleeper_spec(1)))
        status = wait_phase(kubectl, namespace, "victim", {"Succeeded", "Failed"}, 300)
        assert status["phase"] == "Succeeded", status

        # The operator looked at every one of the tenant's jobs (the models refuse each: over
        # the whole-spec limit) and is still the same process.
        def all_failed() -> bool:
            listed = json.loads(kubectl("get", "ftj", "-n", tenant, "-o", "json").stdout)
            phases = [(i.get("status") or {}).get("phase") for i in listed["items"]]
            return len(phases) == TENANT_JOBS and all(p == "Failed" for p in phases)

        wait_for(all_failed, 300, "every large job to fail InvalidSpec")
        assert process.process is not None and process.process.poll() is None
        peak = peak_rss(process.process.pid)
        limit = chart_memory_limit()
        print(f"{TENANT_JOBS} jobs of {size} bytes: operator peak RSS {peak / 2**20:.1f} MiB")
        assert peak < limit, (peak, limit)
    finally:
        print(f"--- operator log (tail) ---\n{process.log_tail()}")
        next(operator, None)
