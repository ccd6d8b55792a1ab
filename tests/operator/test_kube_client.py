"""The operator's API client (operator/kube.py) against the real kube-apiserver: what each
answer becomes, what it counts, and how it gets past connections the server closed or that went
silent (through a proxy in front of the apiserver, stallproxy.py)."""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kopf
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader
from prometheus_client import REGISTRY
from stallproxy import StallingProxy

from kubetune.operator.errors import api_errors
from kubetune.operator.kube import Kube, collection_path
from kubetune_devtools.pytest_plugin import Kubectl

pytestmark = pytest.mark.integration

NAMESPACE = "default"
CONFIGMAPS = collection_path("v1", "ConfigMap", NAMESPACE)


def kube_for(kubeconfig: Path, timeout: float = 30.0) -> Kube:
    """The operator's client as ``load_config`` makes it, from this kubeconfig."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return Kube(client.ApiClient(configuration), timeout)


def config_map(name: str, value: str = "v") -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"test": "kube-client"}},
        "data": {"config.yaml": value},
    }


def counted(verb: str, code: str) -> float:
    labels = {"verb": verb, "resource": "configmaps", "code": code}
    return REGISTRY.get_sample_value("kubetune_api_requests_total", labels) or 0.0


@pytest.fixture
def name(kubeconfig_path: Path) -> Iterator[str]:
    made = f"kube-client-{uuid.uuid4().hex[:8]}"
    yield made
    with contextlib.suppress(ApiException):
        kube_for(kubeconfig_path).delete(f"{CONFIGMAPS}/{made}")


@pytest.fixture
def proxy(kubeconfig_path: Path) -> Iterator[StallingProxy]:
    server = yaml.safe_load(kubeconfig_path.read_text())["clusters"][0]["cluster"]["server"]
    target = urlsplit(server)
    with StallingProxy((target.hostname or "127.0.0.1", target.port or 443)) as running:
        yield running


def test_answers_become_objects_errors_and_counts(kubeconfig_path: Path, name: str) -> None:
    kube = kube_for(kubeconfig_path)
    created_before, conflicts_before = counted("POST", "201"), counted("POST", "409")

    made, created = kube.create_or_existing(config_map(name, "first"))
    assert created and made["metadata"]["name"] == name
    existing, created = kube.create_or_existing(config_map(name, "second"))
    assert not created and existing["data"] == {"config.yaml": "first"}
    assert counted("POST", "201") == created_before + 1
    assert counted("POST", "409") == conflicts_before + 1

    patched = kube.merge_patch(f"{CONFIGMAPS}/{name}", {"data": {"more": "yes"}})
    assert patched["data"] == {"config.yaml": "first", "more": "yes"}
    listed = kube.get(CONFIGMAPS, query={"labelSelector": "test=kube-client"})
    assert name in [item["metadata"]["name"] for item in listed["items"]]

    with pytest.raises(ApiException) as refused:
        kube.request("POST", CONFIGMAPS, body={**config_map(name), "data": {"bad key!": "x"}})
    assert refused.value.status == 422
    assert "bad key!" in str(refused.value.body)
    with pytest.raises(kopf.PermanentError), api_errors("creating a ConfigMap"):
        kube.request("POST", CONFIGMAPS, body={**config_map(name), "data": {"bad key!": "x"}})

    kube.delete(f"{CONFIGMAPS}/{name}")
    assert kube.get_or_none(f"{CONFIGMAPS}/{name}") is None
    kube.delete(f"{CONFIGMAPS}/{name}")  # gone already: nothing to do


def test_a_connection_the_server_closed_is_opened_again(
    kubeconfig_path: Path, proxy: StallingProxy, tmp_path: Path, name: str
) -> None:
    kube = kube_for(proxy.kubeconfig(kubeconfig_path, tmp_path / "kubeconfig"))
    kube.create(config_map(name))
    kube.get(f"{CONFIGMAPS}/{name}")
    assert proxy.opened == 1  # one kept-alive connection for both

    assert proxy.drop() == 1
    assert kube.get(f"{CONFIGMAPS}/{name}")["metadata"]["name"] == name
    assert proxy.opened == 2


def test_a_connection_gone_silent_fails_one_request_and_the_next_gets_through(
    kubeconfig_path: Path, proxy: StallingProxy, tmp_path: Path, name: str
) -> None:
    kube = kube_for(proxy.kubeconfig(kubeconfig_path, tmp_path / "kubeconfig"), timeout=1.0)
    kube.create(config_map(name))
    unanswered_before = counted("GET", "0")

    assert proxy.stall() == 1
    with pytest.raises(kopf.TemporaryError), api_errors(f"reading {name}"):
        kube.get(f"{CONFIGMAPS}/{name}")
    assert counted("GET", "0") == unanswered_before + 1
    assert kube.get(f"{CONFIGMAPS}/{name}")["metadata"]["name"] == name
    assert proxy.opened == 2


def test_in_a_pod_requests_carry_the_pods_service_account_token(
    kubeconfig_path: Path, kubectl: Kubectl, tmp_path: Path
) -> None:
    """In a pod the client is configured from the service's address, the CA file and the
    projected token file (``load_incluster_config``): the API server sees the pod's identity."""
    cluster = yaml.safe_load(kubeconfig_path.read_text())["clusters"][0]["cluster"]
    server = urlsplit(cluster["server"])
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    else:
        ca = Path(cluster["certificate-authority"]).read_bytes()
    (tmp_path / "ca.crt").write_bytes(ca)
    token = kubectl("create", "token", "default", "-n", NAMESPACE).stdout.strip()
    (tmp_path / "token").write_text(token)
    configuration = client.Configuration()
    InClusterConfigLoader(
        token_filename=str(tmp_path / "token"),
        cert_filename=str(tmp_path / "ca.crt"),
        environ={
            "KUBERNETES_SERVICE_HOST": server.hostname or "",
            "KUBERNETES_SERVICE_PORT": str(server.port),
        },
    ).load_and_set(configuration)
    kube = Kube(client.ApiClient(configuration))

    with pytest.raises(ApiException) as refused:  # the default account may read no ConfigMaps
        kube.get(CONFIGMAPS)
    assert refused.value.status == 403
    assert f"system:serviceaccount:{NAMESPACE}:default" in str(refused.value.body)


def test_a_large_answer_sent_in_chunks_reads_back_whole(kubeconfig_path: Path, name: str) -> None:
    """The apiserver sends a large object's answer in chunks (a small one with its length):
    either reads back as it was written, non-ASCII text included."""
    kube = kube_for(kubeconfig_path)
    large = "".join(chr(0x41 + i % 50) for i in range(300_000))
    made = kube.create(config_map(name, large))
    assert made["data"]["config.yaml"] == large
    kube.merge_patch(f"{CONFIGMAPS}/{name}", {"data": {"note": "é ✓ 🙂"}})
    read = kube.get(f"{CONFIGMAPS}/{name}")
    assert read["data"] == {"config.yaml": large, "note": "é ✓ 🙂"}
    assert kube.get(f"{CONFIGMAPS}/{name}")["data"]["note"] == "é ✓ 🙂"  # the same connection
