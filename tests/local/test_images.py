"""Pods from images on the real node (``real_node``: the upstream kubelet with containerd and
runc): each container runs in its image's root filesystem (the operator image `make images`
builds from the Dockerfile, imported into the node's containerd) with the image's ENTRYPOINT,
CMD, ENV, WORKDIR and USER under the pod's overrides; an image the node doesn't have waits, as
the node reaches no registry."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_devtools.installs import built_images, project_version
from kubetune_devtools.pytest_plugin import (
    Kubectl,
    apply,
    get_json,
    on_real_node,
    pod_manifest,
    run_to_end,
    wait_for,
)

pytestmark = pytest.mark.integration

VERSION = project_version()
OPERATOR_IMAGE = f"kubetune/operator:{VERSION}"


@pytest.fixture(scope="module", autouse=True)
def operator_image() -> None:
    built_images("operator")


def image_pod(name: str, image: str, **container: Any) -> dict[str, Any]:
    pod_security = container.pop("pod_security", {})
    return pod_manifest(
        name,
        {"name": "main", "image": image, **container},
        **on_real_node(),
        securityContext=pod_security,
    )


def waiting_reason(kubectl: Kubectl, namespace: str, name: str) -> str | None:
    statuses = get_json(kubectl, "pod", name, "-n", namespace)["status"].get(
        "containerStatuses"
    ) or [{}]
    return ((statuses[0].get("state") or {}).get("waiting") or {}).get("reason")


def test_image_entrypoint_runs_with_the_pods_args_as_the_images_user(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    pod = run_to_end(
        kubectl, namespace, image_pod("entrypoint", OPERATOR_IMAGE, args=["--help"]), 60
    )
    assert pod["status"]["phase"] == "Succeeded", kubectl("logs", "entrypoint", "-n", namespace)
    assert "usage: kubetune-operator" in kubectl("logs", "entrypoint", "-n", namespace).stdout
    status = pod["status"]["containerStatuses"][0]
    assert status["image"] == f"docker.io/{OPERATOR_IMAGE}"
    assert status["imageID"].startswith("docker.io/kubetune/operator@sha256:")


def test_container_root_is_the_images_read_only_root_with_its_env_user_and_volumes(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    script = (
        "cat /opt/kubetune/IMAGE-VERSION; id -u; echo PATH=$PATH; pwd;"
        " touch /written 2>/dev/null || echo root-read-only;"
        " echo data > /scratch/file && cat /scratch/file;"
        " echo done > /dev/termination-log"
    )
    pod = image_pod(
        "rootfs",
        OPERATOR_IMAGE,
        command=["sh", "-c", script],
        securityContext={"readOnlyRootFilesystem": True},
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    pod["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]

    status = run_to_end(kubectl, namespace, pod, 60)["status"]
    log = kubectl("logs", "rootfs", "-n", namespace).stdout.splitlines()
    assert status["phase"] == "Succeeded", log
    assert log[0] == f"kubetune-operator {VERSION}"  # the image's file, not the host's
    assert log[1] == "10001"  # the image's USER
    assert log[2].startswith("PATH=/opt/kubetune/bin:")  # the image's ENV
    assert log[3:] == ["/", "root-read-only", "data"]
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == "done\n"


def test_pod_overrides_user_env_and_working_dir_of_the_image(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    pod = image_pod(
        "overrides",
        OPERATOR_IMAGE,
        command=["sh", "-c", "id -u; id -g; echo $PYTHONUNBUFFERED; pwd"],
        env=[{"name": "PYTHONUNBUFFERED", "value": "no"}],
        workingDir="/opt/kubetune",
        pod_security={"runAsUser": 4242, "runAsGroup": 4343},
    )

    assert run_to_end(kubectl, namespace, pod, 60)["status"]["phase"] == "Succeeded"
    log = kubectl("logs", "overrides", "-n", namespace).stdout.splitlines()
    assert log == ["4242", "4343", "no", "/opt/kubetune"]


def test_run_as_non_root_refuses_a_user_of_root_and_the_pod_waits(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    as_root = {"runAsNonRoot": True, "runAsUser": 0}
    pod = image_pod("as-root", OPERATOR_IMAGE, command=["true"], securityContext=as_root)
    apply(kubectl, namespace, pod)

    wait_for(
        lambda: waiting_reason(kubectl, namespace, "as-root") == "CreateContainerConfigError",
        60,
        "CreateContainerConfigError",
    )
    pod = get_json(kubectl, "pod", "as-root", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    assert "non-root" in message


def test_absent_image_with_pull_policy_never_waits_with_err_image_never_pull(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    apply(
        kubectl,
        namespace,
        image_pod("absent", "kubetune/absent:1", imagePullPolicy="Never", command=["true"]),
    )

    wait_for(
        lambda: waiting_reason(kubectl, namespace, "absent") == "ErrImageNeverPull",
        30,
        "ErrImageNeverPull",
    )
    pod = get_json(kubectl, "pod", "absent", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    assert "kubetune/absent:1" in message and "Never" in message


def test_absent_image_otherwise_backs_off_pulling_it(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    apply(kubectl, namespace, image_pod("unpullable", "kubetune/absent:2", command=["true"]))

    wait_for(
        lambda: waiting_reason(kubectl, namespace, "unpullable") == "ImagePullBackOff",
        30,
        "ImagePullBackOff",
    )
    assert get_json(kubectl, "pod", "unpullable", "-n", namespace)["status"]["phase"] == "Pending"
