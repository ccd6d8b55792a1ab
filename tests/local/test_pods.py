"""Pods on the local cluster's real node (``real_node``: the upstream kubelet with containerd and
runc), and on real nodes a test adds: scheduling, volumes, identity, status. Their containers run
the operator image's shell and Python (``operator_image``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_devtools.pytest_plugin import (
    AddNode,
    Kubectl,
    apply,
    get_json,
    on_real_node,
    operator_image,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("real_node")]
#: For pods that write into a directory of the host (a claim's, the test's): its owner.
AS_ROOT = {"securityContext": {"runAsUser": 0}}

GPU = "nvidia.com/gpu"


def shell(script: str, **container: Any) -> dict[str, Any]:
    """A container ``main`` of the operator image that runs ``sh -c script``."""
    return {
        "name": "main",
        "image": operator_image(),
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        **container,
    }


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    """Pod ``name`` that runs ``script`` once; on the session's real node unless ``spec`` places
    it (``nodeSelector``)."""
    container = shell(script, **spec.pop("container", {}))
    placement = {} if "nodeSelector" in spec else on_real_node()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **placement, **spec},
    }


def phase(kubectl: Kubectl, namespace: str, name: str) -> str:
    return str(get_json(kubectl, "pod", name, "-n", namespace)["status"].get("phase"))


def finished(kubectl: Kubectl, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        current = get_json(kubectl, "pod", name, "-n", namespace)
        return current if current["status"].get("phase") in ("Succeeded", "Failed") else None

    return dict(wait_for(done, timeout, f"pod {name} to finish"))


def max_gpus(kubectl: Kubectl) -> int:
    nodes = get_json(kubectl, "nodes")["items"]
    return max(int(n["status"].get("allocatable", {}).get(GPU, 0)) for n in nodes)


def test_gpu_pod_stays_pending_until_a_node_with_gpus_joins(
    kubectl: Kubectl, namespace: str, add_node: AddNode
) -> None:
    # More GPUs than any node has (none, on a fresh test cluster).
    wanted = max_gpus(kubectl) + 1
    apply(
        kubectl,
        namespace,
        pod(
            "trainer",
            "echo scheduled",
            container={"resources": {"limits": {GPU: wanted}}},
            # Any node with the GPUs, the added one being the only one.
            nodeSelector={},
        ),
    )

    def unschedulable() -> dict[str, Any] | None:
        conditions = get_json(kubectl, "pod", "trainer", "-n", namespace)["status"].get(
            "conditions", []
        )
        return next(
            (
                c
                for c in conditions
                if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            ),
            None,
        )

    condition = wait_for(unschedulable, 30, "the scheduler to give up on the pod")
    assert f"Insufficient {GPU}" in condition["message"]
    time.sleep(2)
    assert phase(kubectl, namespace, "trainer") == "Pending"

    node = add_node(f"gpu-{namespace[-5:]}", gpus=wanted)

    done = finished(kubectl, namespace, "trainer")
    assert done["status"]["phase"] == "Succeeded"
    assert done["spec"]["nodeName"] == node
    assert kubectl("logs", "trainer", "-n", namespace).stdout.strip() == "scheduled"


def test_node_selector_and_toleration_place_a_pod_on_a_tainted_node(
    kubectl: Kubectl, namespace: str, add_node: AddNode
) -> None:
    node = add_node(
        f"pool-{namespace[-5:]}",
        labels=["kubetune.io/pool=special"],
        taints=["kubetune.io/dedicated=special:NoSchedule"],
    )
    selector = {"kubetune.io/pool": "special"}
    toleration = {
        "key": "kubetune.io/dedicated",
        "operator": "Equal",
        "value": "special",
        "effect": "NoSchedule",
    }
    apply(
        kubectl,
        namespace,
        pod("tolerant", "true", nodeSelector=selector, tolerations=[toleration]),
        pod("intolerant", "true", nodeSelector=selector),
    )

    done = finished(kubectl, namespace, "tolerant")

    assert done["status"]["phase"] == "Succeeded"
    assert done["spec"]["nodeName"] == node
    assert phase(kubectl, namespace, "intolerant") == "Pending"
    assert not get_json(kubectl, "pod", "intolerant", "-n", namespace)["spec"].get("nodeName")


def test_a_claim_written_by_one_pod_is_read_by_the_next(kubectl: Kubectl, namespace: str) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    volume = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    apply(
        kubectl,
        namespace,
        claim,
        pod("writer", "echo from-writer > /data/note.txt", container=mount | AS_ROOT, **volume),
    )
    assert finished(kubectl, namespace, "writer")["status"]["phase"] == "Succeeded"

    apply(kubectl, namespace, pod("reader", "cat /data/note.txt", container=mount, **volume))

    assert finished(kubectl, namespace, "reader")["status"]["phase"] == "Succeeded"
    assert kubectl("logs", "reader", "-n", namespace).stdout.strip() == "from-writer"
    bound = get_json(kubectl, "pvc", "data", "-n", namespace)
    assert bound["status"]["phase"] == "Bound"
    assert bound["spec"]["storageClassName"] == "standard"


# Runs inside the pod with the image's Python: calls the apiserver with the
# mounted token the way an in-cluster client does, and reports what it may do.
_PROBE = r"""
import json, os, ssl, urllib.request, urllib.error
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(f"{sa}/token").read()
namespace = open(f"{sa}/namespace").read()
context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
base = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
def call(method, path, body=None):
    request = urllib.request.Request(base + path, method=method,
        data=json.dumps(body).encode() if body else None,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, None
_, review = call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                 {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
result = {
    "user": review["status"]["userInfo"]["username"],
    "namespace": namespace,
    "list_configmaps": call("GET", f"/api/v1/namespaces/{namespace}/configmaps")[0],
    "list_secrets": call("GET", f"/api/v1/namespaces/{namespace}/secrets")[0],
    "list_pods_elsewhere": call("GET", "/api/v1/namespaces/default/pods")[0],
}
open("/dev/termination-log", "w").write(json.dumps(result))
"""


def test_projected_token_has_exactly_its_service_accounts_rbac(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubectl(
        "create",
        "role",
        "read-configmaps",
        "--verb=get,list",
        "--resource=configmaps",
        "-n",
        namespace,
    )
    kubectl(
        "create",
        "rolebinding",
        "reader",
        "--role=read-configmaps",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    apply(
        kubectl,
        namespace,
        pod(
            "probe",
            "",
            serviceAccountName="reader",
            container={"command": ["python", "-c", _PROBE]},
        ),
    )

    done = finished(kubectl, namespace, "probe")

    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert done["status"]["phase"] == "Succeeded", terminated
    assert json.loads(terminated["message"]) == {
        "user": f"system:serviceaccount:{namespace}:reader",
        "namespace": namespace,
        "list_configmaps": 200,
        "list_secrets": 403,
        "list_pods_elsewhere": 403,
    }


def test_termination_message_reaches_the_pod_status(kubectl: Kubectl, namespace: str) -> None:
    apply(
        kubectl,
        namespace,
        pod("reporter", 'printf \'{"outcome": "succeeded"}\' > /dev/termination-log'),
        pod(
            "custom-path",
            "echo done > /tmp/kubetune-result; exit 4",
            container={"terminationMessagePath": "/tmp/kubetune-result"},
        ),
        pod(
            "crasher",
            "echo something broke >&2; exit 1",
            container={"terminationMessagePolicy": "FallbackToLogsOnError"},
        ),
    )

    reporter = finished(kubectl, namespace, "reporter")["status"]["containerStatuses"][0]
    custom = finished(kubectl, namespace, "custom-path")["status"]["containerStatuses"][0]
    crasher = finished(kubectl, namespace, "crasher")["status"]["containerStatuses"][0]

    assert reporter["state"]["terminated"]["message"] == '{"outcome": "succeeded"}'
    assert custom["state"]["terminated"]["message"] == "done\n"
    assert custom["state"]["terminated"]["exitCode"] == 4
    # The log's tail, as the kubelet reads it: its line break kept.
    assert crasher["state"]["terminated"]["message"] == "something broke\n"


def test_env_and_volumes_reach_the_container(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "configmap", "settings", "--from-literal=mode=fast", "-n", namespace)
    kubectl("create", "secret", "generic", "creds", "--from-literal=token=s3cr3t", "-n", namespace)
    script = (
        'echo "$MODE $TOKEN $POD $cfg_mode $GREETING"; cat /etc/settings/mode; echo;'
        " cat /etc/creds/token; echo; cat /etc/info/name; echo; test -d /scratch"
        " && test -f /var/run/secrets/kubernetes.io/serviceaccount/token"
    )
    spec = pod(
        "env",
        script,
        container={
            "env": [
                {
                    "name": "MODE",
                    "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}},
                },
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "GREETING", "value": "hi-$(POD)"},
            ],
            "envFrom": [{"prefix": "cfg_", "configMapRef": {"name": "settings"}}],
            "volumeMounts": [
                {"name": "settings", "mountPath": "/etc/settings"},
                {"name": "creds", "mountPath": "/etc/creds"},
                {"name": "info", "mountPath": "/etc/info"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        volumes=[
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {
                "name": "info",
                "downwardAPI": {
                    "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                },
            },
            {"name": "scratch", "emptyDir": {"medium": "Memory"}},
        ],
    )
    apply(kubectl, namespace, spec)

    assert finished(kubectl, namespace, "env")["status"]["phase"] == "Succeeded"
    assert kubectl("logs", "env", "-n", namespace).stdout.splitlines() == [
        "fast s3cr3t env fast hi-env",
        "fast",
        "s3cr3t",
        "env",
    ]


def test_deleting_a_pod_sends_sigterm_then_removes_it(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "terminated"
    script = f"trap 'echo got SIGTERM > {marker}; exit 0' TERM; while true; do sleep 0.1; done"
    # The test's directory, seen by the pod where it is on the host.
    mount = {"volumeMounts": [{"name": "marker", "mountPath": str(tmp_path)}]}
    volume = {"name": "marker", "hostPath": {"path": str(tmp_path), "type": "Directory"}}
    graceful = pod(
        "graceful",
        script,
        container=mount | AS_ROOT,
        volumes=[volume],
        terminationGracePeriodSeconds=10,
    )
    apply(kubectl, namespace, graceful)
    wait_for(lambda: phase(kubectl, namespace, "graceful") == "Running", 60, "pod to run")
    time.sleep(0.5)  # let the shell install its trap

    kubectl("delete", "pod", "graceful", "-n", namespace, "--timeout=30s")

    assert marker.read_text() == "got SIGTERM\n"
    assert kubectl("get", "pod", "graceful", "-n", namespace, check=False).returncode != 0


def test_init_containers_run_first_and_in_order(kubectl: Kubectl, namespace: str) -> None:
    mount = {"volumeMounts": [{"name": "work", "mountPath": "/work"}]}
    spec = pod(
        "ordered", "cat /work/order", container=mount, volumes=[{"name": "work", "emptyDir": {}}]
    )
    spec["spec"]["initContainers"] = [
        shell(f"echo init-{i} >> /work/order", name=f"init-{i}", **mount) for i in (1, 2)
    ]
    apply(kubectl, namespace, spec)

    done = finished(kubectl, namespace, "ordered")

    assert done["status"]["phase"] == "Succeeded"
    assert kubectl("logs", "ordered", "-n", namespace, "-c", "main").stdout.split() == [
        "init-1",
        "init-2",
    ]
    init_states = [s["state"]["terminated"] for s in done["status"]["initContainerStatuses"]]
    assert [s["exitCode"] for s in init_states] == [0, 0]
    assert init_states[0]["finishedAt"] <= init_states[1]["startedAt"]
