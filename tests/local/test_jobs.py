"""batch/v1 Jobs run by the real Job controller on the local cluster's real node (``real_node``:
the upstream kubelet with containerd and runc), in the operator image (``operator_image``)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_devtools.pytest_plugin import (
    Kubectl,
    apply,
    get_json,
    on_real_node,
    operator_image,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("real_node")]


def job(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": spec.pop("backoffLimit", 0),
            **spec,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": operator_image(),
                            "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script],
                        }
                    ],
                    **on_real_node(),
                }
            },
        },
    }


def finished_condition(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    conditions = get_json(kubectl, "job", name, "-n", namespace)["status"].get("conditions", [])
    for condition in conditions:
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return dict(condition)
    return None


def job_pods(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={name}")
    return list(pods["items"])


def test_job_runs_its_command_to_success(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job("ok", "echo hello; exit 0"))

    condition = wait_for(lambda: finished_condition(kubectl, namespace, "ok"), 60, "job ok")

    assert condition["type"] == "Complete"
    [pod] = job_pods(kubectl, namespace, "ok")
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["startedAt"] <= terminated["finishedAt"]


def test_failing_job_is_retried_up_to_its_backoff_limit(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job("flaky", "echo trying; exit 3", backoffLimit=1))

    condition = wait_for(lambda: finished_condition(kubectl, namespace, "flaky"), 90, "job flaky")

    assert condition["type"] == "Failed"
    assert condition["reason"] == "BackoffLimitExceeded"
    pods = job_pods(kubectl, namespace, "flaky")
    assert len(pods) == 2  # the first try and one retry
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")


def test_pod_failure_policy_fails_the_job_fast_on_an_exit_code(
    kubectl: Kubectl, namespace: str
) -> None:
    policy = {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]},
            }
        ]
    }
    apply(
        kubectl, namespace, job("invalid-config", "exit 2", backoffLimit=6, podFailurePolicy=policy)
    )

    condition = wait_for(
        lambda: finished_condition(kubectl, namespace, "invalid-config"), 60, "job invalid-config"
    )

    assert condition["type"] == "Failed"
    assert condition["reason"] == "PodFailurePolicy"
    assert len(job_pods(kubectl, namespace, "invalid-config")) == 1  # no retry


def test_kubectl_logs_shows_the_container_output(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job("talker", "echo first line; echo second line >&2"))
    wait_for(lambda: finished_condition(kubectl, namespace, "talker"), 60, "job talker")

    logs = kubectl("logs", "-n", namespace, "job/talker").stdout

    # Both streams; the runtime reads stdout and stderr apart, so lines written in the same
    # instant may come in either order.
    assert sorted(logs.splitlines()) == ["first line", "second line"]
    tail = kubectl("logs", "-n", namespace, "job/talker", "--tail=1").stdout
    assert tail.splitlines() == logs.splitlines()[-1:]


def test_deleting_the_owner_garbage_collects_the_job_and_its_pods(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    manifest = job("owned", "sleep 300")
    # The shell, pid 1 of its container, ignores SIGTERM: no grace to wait out.
    manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 0
    manifest["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    ]
    apply(kubectl, namespace, manifest)
    wait_for(
        lambda: [
            p
            for p in job_pods(kubectl, namespace, "owned")
            if p["status"].get("phase") == "Running"
        ],
        60,
        "running pod",
    )

    kubectl("delete", "configmap", "owner", "-n", namespace)

    wait_for(
        lambda: kubectl("get", "job", "owned", "-n", namespace, check=False).returncode != 0,
        60,
        "the job to be collected",
    )
    wait_for(
        lambda: not get_json(kubectl, "pods", "-n", namespace)["items"],
        60,
        "the pods to be collected",
    )
