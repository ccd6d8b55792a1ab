"""The OpenAI fine-tuning API as a platform runs it: kubetune-server started by the chart
(server.enabled) from the operator image on the image node, driven by the pinned openai SDK with a
tenant's ServiceAccount token; the trainer pod downloads the upload through its signed URL."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ekit import CLAIM, SYSTEM_NAMESPACE, seed_demo_claim
from openai import OpenAI

from kubetune.local.components import SERVICE_CLUSTER_IP_RANGE
from kubetune_devtools.pytest_plugin import (
    REAL_NODE_ONLY,
    ClusterHandle,
    Kubectl,
    apply,
    get_json,
    on_real_node,
    port_forward,
)
from kubetune_devtools.tiny import tiny_cpu_settings

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("kubetune_release")]

PORT = 8080  # the server's Service and container port
#: The server as trainer pods reach it, to download what was uploaded (cluster DNS, kube-proxy).
IN_CLUSTER = f"http://kubetune-server.{SYSTEM_NAMESPACE}.svc.cluster.local:{PORT}"
TEMPLATE: dict[str, Any] = {
    **tiny_cpu_settings(),
    "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi", "shmSize": "256Mi"},
    "scheduling": on_real_node(),
}  # fmt: skip
KEY = REAL_NODE_ONLY.replace(".", "\\.")
CHART_ARGS = [
    "--set", "server.enabled=true",
    "--set", f"server.port={PORT}",
    "--set", f"server.datasetBaseUrl={IN_CLUSTER}",
    "--set", "server.rateLimitPerSecond=0",
    "--set", f"server.outputUri=pvc://{CLAIM}/adapters/{{job}}",
    "--set-json", f'server.models={{"tiny": "pvc://{CLAIM}/model"}}',
    "--set-json", f"server.jobTemplate={json.dumps(TEMPLATE)}",
    "--set", f"server.nodeSelector.{KEY}=only",
    "--set", f"server.tolerations[0].key={REAL_NODE_ONLY}",
    "--set", "server.tolerations[0].operator=Exists",
    "--set", "server.tolerations[0].effect=NoSchedule",
    # Trainers download uploads from the server, through its Service.
    "--set", f"trainer.downloadAllowedCIDRs={{{SERVICE_CLUSTER_IP_RANGE}}}",
]  # fmt: skip
TENANT_RULES = [
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list"]},
    # The references policy: whoever creates a job must be allowed to read the claims it names
    # (the platform's model and output claim here).
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
]  # fmt: skip


@pytest.fixture(autouse=True)
def _server_log(kubectl: Kubectl) -> Iterator[None]:
    """After the test, the server pod's log tail (shown for a failing test)."""
    yield
    log = kubectl("logs", "deploy/kubetune-server", "-n", SYSTEM_NAMESPACE, "--tail", "60",
                  check=False)  # fmt: skip
    print(f"--- kubetune-server log (tail) ---\n{log.stdout}{log.stderr}")


def tenant_token(kubectl: Kubectl, namespace: str) -> str:
    apply(
        kubectl, namespace,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "alice"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "alice"}, "rules": TENANT_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "alice"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "alice"},
         "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}]},
    )  # fmt: skip
    return kubectl("create", "token", "alice", "-n", namespace, "--duration", "1h").stdout.strip()


def test_an_upload_trains_through_the_chart_started_server_to_the_adapter_it_names(
    kubectl: Kubectl, namespace: str, tiny_assets: Path, local_cluster: ClusterHandle
) -> None:
    seed_demo_claim(kubectl, namespace)
    server = port_forward(local_cluster, SYSTEM_NAMESPACE, "service/kubetune-server", PORT)
    with server as local_port:
        client = OpenAI(
            api_key=tenant_token(kubectl, namespace), base_url=f"http://127.0.0.1:{local_port}/v1",
            project=namespace, max_retries=0, timeout=60,
        )  # fmt: skip
        run_upload(kubectl, namespace, tiny_assets, client)


def run_upload(kubectl: Kubectl, namespace: str, tiny_assets: Path, client: OpenAI) -> None:
    dataset = tiny_assets / "data" / "reverse-prompt-completion.jsonl"
    with dataset.open("rb") as handle:
        uploaded = client.files.create(file=(dataset.name, handle), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, suffix="e2e")

    last: tuple[Any, ...] = ()
    changed, longest = time.monotonic(), 0.0
    while (current := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded", "failed", "cancelled",
    ):  # fmt: skip
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        seen = (current.status, len(events))
        now = time.monotonic()
        if seen != last:
            longest = max(longest, now - changed) if last else 0.0
            last, changed = seen, now
        # The deadline moves with what the job shows (a busy machine slows every step).
        assert now - changed < max(300.0, 4 * longest), f"{job.id} stopped moving at {seen}"
        time.sleep(2)
    assert current.status == "succeeded", current.error
    model = client.models.retrieve(current.fine_tuned_model or "")
    status = get_json(kubectl, "ftj", job.id, "-n", namespace)["status"]
    adapter = status["result"]["adapter"]
    assert model.model_extra is not None
    assert model.model_extra["adapter"]["sha256"] == adapter["sha256"]
    claim = get_json(kubectl, "pvc", CLAIM, "-n", namespace)["spec"]["volumeName"]
    root = Path(get_json(kubectl, "pv", claim)["spec"]["hostPath"]["path"])
    local = root / adapter["uri"].removeprefix(f"pvc://{CLAIM}/")
    weights = local / "adapter_model.safetensors" if local.is_dir() else local
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == adapter["sha256"]
