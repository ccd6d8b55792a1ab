"""Pods of one Indexed Job find each other by name on the real node, through cluster DNS (the
node's CoreDNS): ``<hostname>.<subdomain>`` of a headless Service resolves inside the pods, each
pod in its own network namespace with its own address."""

from __future__ import annotations

import ipaddress
import textwrap
from collections.abc import Mapping
from typing import Any

import pytest

from kubetune.local.real_node_config import POD_NETWORKS
from kubetune_devtools.pytest_plugin import (
    Kubectl,
    apply,
    get_json,
    on_real_node,
    operator_image,
    wait_for,
)

#: Where a multi-pod group's rank 0 listens (the operator's rendezvous port).
RENDEZVOUS_PORT = 29400

# Rank 0 listens; rank 1 finds it by name and connects from its own address (found by its own
# host name, as gloo does); rank 0 checks that address is what rank 1's name resolves to.
SCRIPT = textwrap.dedent("""
    import os, socket, sys, time
    rank, namespace, port = int(os.environ["JOB_COMPLETION_INDEX"]), sys.argv[1], int(sys.argv[2])
    other = f"dns-{1 - rank}.peers"
    assert socket.gethostname() == f"dns-{rank}", socket.gethostname()

    def resolve(name):
        deadline = time.monotonic() + 60
        while True:
            try:
                return socket.gethostbyname(name)
            except socket.gaierror:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    mine = socket.gethostbyname(socket.gethostname())
    theirs = resolve(other)
    assert resolve(f"{other}.{namespace}.svc.cluster.local") == theirs
    print(f"rank {rank} is {mine}; {other} is {theirs}", flush=True)
    if rank == 0:
        server = socket.create_server(("", port))
        server.settimeout(90)
        connection, (source, _) = server.accept()
        print(f"hello from {source}: {connection.recv(100).decode()}", flush=True)
        assert source == theirs, (source, theirs)
    else:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection((other, port), 5, source_address=(mine, 0)) as s:
                    s.sendall(socket.gethostname().encode())
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
""")


def peers_find_each_other(
    kubectl: Kubectl,
    namespace: str,
    port: int,
    container: Mapping[str, Any],
    **pod_spec: Any,
) -> dict[int, str]:
    """Run ``SCRIPT`` as Indexed Job ``dns`` of two pods (``container``'s image and pull policy,
    ``pod_spec``'s placement), rank 0 listening on ``port``, under headless Service ``peers``;
    assert both pods found and reached each other by name; each rank's pod address."""
    labels = {"app": "peers"}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
        "spec": {"clusterIP": "None", "selector": labels, "publishNotReadyAddresses": True},
    }  # fmt: skip
    job: dict[str, Any] = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "dns"},
        "spec": {
            "completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never", "subdomain": "peers", **pod_spec,
                    "containers": [{"name": "main", **container,
                                    "command": ["python", "-c", SCRIPT, namespace, str(port)]}],
                },
            },
        },
    }  # fmt: skip
    apply(kubectl, namespace, service)
    apply(kubectl, namespace, job)

    def finished() -> str | None:
        status = get_json(kubectl, "job", "dns", "-n", namespace)["status"]
        done = [c["type"] for c in status.get("conditions", []) if c["status"] == "True"]
        return next((c for c in done if c in ("Complete", "Failed")), None)

    outcome = wait_for(finished, 120, "the Indexed Job to finish")
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=dns")
    by_rank = {
        int(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]): p
        for p in pods["items"]
    }
    logs = {r: kubectl("logs", p["metadata"]["name"], "-n", namespace).stdout
            for r, p in by_rank.items()}  # fmt: skip
    assert outcome == "Complete", logs
    addresses = {r: str(p["status"]["podIP"]) for r, p in by_rank.items()}
    assert len(set(addresses.values())) == 2
    assert f"dns-1.peers is {addresses[1]}" in logs[0]
    assert f"dns-0.peers is {addresses[0]}" in logs[1]
    assert f"hello from {addresses[1]}: dns-1" in logs[0]
    return addresses


@pytest.mark.integration
def test_two_pods_of_an_indexed_job_find_each_other_through_cluster_dns(
    kubectl: Kubectl, namespace: str, real_node: str
) -> None:
    """A multi-pod group's rendezvous as the operator renders it (an Indexed Job whose pods'
    subdomain is a headless Service), on the real node: the names come from CoreDNS, each pod
    has its own network namespace and address, and rank 0 listens on the group's port."""
    addresses = peers_find_each_other(
        kubectl,
        namespace,
        RENDEZVOUS_PORT,
        {"image": operator_image(), "imagePullPolicy": "Never"},
        **on_real_node(),
    )
    assert all(ipaddress.ip_address(a) in POD_NETWORKS for a in addresses.values())
