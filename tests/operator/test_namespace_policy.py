"""The trainers' NetworkPolicies come back when someone with edit rights deletes or changes them.

The namespace's shared ``kubetune-trainers`` and a multi-pod group's own policy are what keeps
the trainer pods in; a user with the ordinary ``edit`` role may delete or rewrite either. While a
FineTuneJob there is unfinished, the operator (kopf's watch of the policies it labels) writes
the rendered one back at once, without waiting for the next job of the namespace. No wait here
has a fixed deadline: each allows ``PACE_FACTOR`` times what the same operator took to make
the policies in the first place (at least ``PATIENCE`` s), so a loaded machine waits longer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from operatorkit import CRD, OperatorProcess, log_tail_after, started

from kubetune_devtools.pytest_plugin import (
    PACE_FACTOR,
    Kubectl,
    get_json,
    install_crd,
    temporary_namespace,
    wait_for,
)

pytestmark = pytest.mark.integration

EDITOR = "policy-editor@example.com"
SHARED = "kubetune-trainers"
#: The least any wait allows, however fast the first policies came.
PATIENCE = 30.0


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(kubectl, CRD)
    yield from started(
        OperatorProcess(kubeconfig_path, tmp_path_factory.mktemp("operator") / "log")
    )


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A namespace where ``EDITOR`` has the built-in ``edit`` role, as a team member would."""
    name = f"policies-{time.time_ns() % 10**8}"
    with contextmanager(temporary_namespace)(kubectl, name) as created:
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "editor", "namespace": created},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": EDITOR}],
        }  # fmt: skip
        kubectl("apply", "-f", "-", input=json.dumps(binding))
        yield created


def suspended_group(name: str, nodes: int) -> dict[str, Any]:
    """A FineTuneJob that stays unfinished (suspended: its Validating phase's Job waits, and
    nothing runs), with its companions made."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "org/model"},
            "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
            "output": {"uri": "s3://bucket/adapter"},
            "resources": {"gpus": 0, "nodes": nodes, "shmSize": "16Mi"},
            "runPolicy": {"suspend": True},
        },
    }


def policy(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    found = kubectl("get", "networkpolicy", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def as_editor(kubectl: Kubectl, *args: str) -> None:
    kubectl("--as", EDITOR, *args)


def first_made(kubectl: Kubectl, namespace: str, names: list[str]) -> float:
    """Seconds from now until every policy of ``names`` exists (the operator making them)."""
    start = time.monotonic()
    wait_for(
        lambda: all(policy(kubectl, namespace, n) for n in names),
        120,
        f"the operator making {names}",
    )
    return time.monotonic() - start


def comes_back(
    kubectl: Kubectl, namespace: str, name: str, pace: float, accept: Callable[[Any], bool]
) -> dict[str, Any]:
    """The policy ``name`` once ``accept`` holds for it, within ``PACE_FACTOR`` × ``pace``."""
    allowed = max(PATIENCE, PACE_FACTOR * pace)
    found: dict[str, Any] = wait_for(
        lambda: (p := policy(kubectl, namespace, name)) is not None and accept(p) and p,
        allowed,
        f"NetworkPolicy {namespace}/{name} back as rendered (allowed {allowed:.0f}s)",
    )
    return found


def test_the_namespace_policy_deleted_or_opened_by_an_editor_comes_back_without_a_new_job(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(suspended_group("held", 1)))
    pace = first_made(kubectl, namespace, [SHARED])
    rendered = policy(kubectl, namespace, SHARED)
    assert rendered is not None
    uid = rendered["metadata"]["uid"]

    as_editor(kubectl, "delete", "networkpolicy", SHARED, "-n", namespace)
    back = comes_back(kubectl, namespace, SHARED, pace, lambda p: p["metadata"]["uid"] != uid)
    assert back["spec"] == rendered["spec"]
    assert back["metadata"]["labels"] == rendered["metadata"]["labels"]

    # Opened to everything (egress anywhere) and narrowed to select nothing: written over.
    opened = {"spec": {"podSelector": {"matchLabels": {"nothing": "selected"}}, "egress": [{}]}}
    as_editor(kubectl, "patch", "networkpolicy", SHARED, "-n", namespace, "--type=merge",
              "-p", json.dumps(opened))  # fmt: skip
    back = comes_back(kubectl, namespace, SHARED, pace, lambda p: p["spec"] == rendered["spec"])
    assert {} not in back["spec"]["egress"]
    # Still the one FineTuneJob, never started: the policy came back by itself, not with a job.
    (ftj,) = get_json(kubectl, "ftj", "-n", namespace)["items"]
    assert ftj["status"]["phase"] == "Suspended"
    restores = operator.metrics().get("kubetune_network_policy_restores_total", 0.0)
    assert restores >= 2


def test_a_groups_own_policy_deleted_by_an_editor_comes_back_owned_by_its_job(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(suspended_group("pair", 2)))
    own = "pair-trainer"
    pace = first_made(kubectl, namespace, [SHARED, own])
    rendered = policy(kubectl, namespace, own)
    assert rendered is not None
    uid = get_json(kubectl, "ftj", "pair", "-n", namespace)["metadata"]["uid"]

    as_editor(kubectl, "delete", "networkpolicy", own, "-n", namespace)
    back = comes_back(
        kubectl, namespace, own, pace,
        lambda p: p["metadata"]["uid"] != rendered["metadata"]["uid"],
    )  # fmt: skip
    assert back["spec"] == rendered["spec"]
    assert back["spec"]["podSelector"]["matchLabels"]["kubetune.io/job-uid"] == uid
    (owner,) = back["metadata"]["ownerReferences"]
    assert owner["uid"] == uid and owner["controller"] is True


def test_a_namespace_with_only_finished_jobs_gets_no_policy_back(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    """Deleted where no job is unfinished, the shared policy stays deleted (it is made again
    with the namespace's next job). Seen against a busy namespace: one policy of each is deleted
    in turn; when the busy one's is back, the operator has had the quiet one's event too."""
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(suspended_group("done", 1)))
    pace = first_made(kubectl, namespace, [SHARED])
    kubectl("delete", "ftj", "done", "-n", namespace, "--wait=true")
    with contextmanager(temporary_namespace)(kubectl, f"{namespace}-busy") as busy:
        kubectl("apply", "-n", busy, "-f", "-", input=json.dumps(suspended_group("held", 1)))
        first_made(kubectl, busy, [SHARED])
        busy_uid = (policy(kubectl, busy, SHARED) or {})["metadata"]["uid"]

        kubectl("delete", "networkpolicy", SHARED, "-n", namespace)
        kubectl("delete", "networkpolicy", SHARED, "-n", busy)
        comes_back(kubectl, busy, SHARED, pace, lambda p, was=busy_uid: p["metadata"]["uid"] != was)
        assert policy(kubectl, namespace, SHARED) is None
