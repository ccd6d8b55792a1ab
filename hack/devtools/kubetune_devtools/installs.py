"""How the tests install kubetune on the local cluster: helm's environment and ``--set``
values, the images built from the Dockerfile, and the operator's Prometheus endpoint."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.local.ports import free_port
from kubetune.local.real_node import NodeState, RealNode
from kubetune.local.real_node_config import cluster_dns
from kubetune_devtools.pytest_plugin import REAL_NODE, REAL_NODE_ONLY

REPO = Path(__file__).resolve().parents[3]


def helm_env(kubeconfig: Path, home: Path) -> dict[str, str]:
    """helm's environment against the cluster of ``kubeconfig``, with its config, cache and data
    directories under ``home``."""
    return {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "HELM_CONFIG_HOME": str(home / "helm-config"),
        "HELM_CACHE_HOME": str(home / "helm-cache"),
        "HELM_DATA_HOME": str(home / "helm-data"),
    }


def local_node_chart_settings() -> list[str]:
    """The chart's values (``--set`` form) that the local node needs, plus quick status."""
    return [
        f"operator.healthPort={free_port()}",  # the local node's pods share the host network
        f"operator.metricsPort={free_port()}",
        # Trainers on the host-network node reach the operator's progress port on loopback (no
        # Service routing there), so the chart's certificate names that address.
        *progress_settings(free_port()),
        # Replicas on one host-network node would share those ports: one (tests/operator covers
        # two replicas as processes, each with its own ports).
        "replicaCount=1",
        "operator.jsonLogs=false",
        "operator.progressIntervalSeconds=1",
        "operator.statusRecheckSeconds=5",
        # The local node runs pods as the host user, not as images: no runAsNonRoot for trainers.
        "trainer.runAsNonRoot=false",
        "trainer.runAsUser=null",
        "trainer.fsGroup=null",
    ]


def project_version() -> str:
    """kubetune's version as pyproject.toml names it: the tag of the images ``built_images``
    builds, and what the operator image's IMAGE-VERSION file says."""
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    found = re.search(r'^version = "(.+)"', pyproject, re.M)
    assert found, "pyproject.toml names no version"
    return found[1]


def built_images(*targets: str) -> Path:
    """Build ``targets`` with hack/images/build.sh (at once when cached); the image store."""
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "KUBETUNE_IMAGE_TARGETS": " ".join(targets)}
    result = subprocess.run(
        ["bash", str(repo / "hack" / "images" / "build.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"building the images {targets} failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def real_node_state(home: Path, name: str = REAL_NODE) -> NodeState:
    """What real node ``name`` of the cluster in ``home`` runs with: its pods' network, its link
    to the host."""
    return NodeState.load(RealNode(home, name).state_dir)


def real_node_chart_settings(home: Path) -> list[str]:
    """The chart's values (``--set`` form) for a release whose operator and trainers run on the
    session's real node (``real_node``, of the cluster in ``home``), with quick status. The
    trainer keeps the chart's security context and its NetworkPolicy, told where this cluster's
    DNS is (as docs/install.md asks of any cluster; they find the progress Service by name) and
    let through to the real node's pods and its link to the host (where the journeys' MLflow
    server and kubetune-server answer), which the default excepts with the rest of 10.0.0.0/8."""
    node = real_node_state(home)
    key = REAL_NODE_ONLY.replace(".", "\\.")
    dns = cluster_dns(ipaddress.IPv4Network(node.pod_network))
    link = ipaddress.IPv4Network(f"{node.host_address}/{node.prefix_length}", strict=False)
    egress = ["0.0.0.0/0", "::/0", node.pod_network, str(link)]
    return [
        "replicaCount=1",
        "operator.jsonLogs=false",
        "operator.progressIntervalSeconds=1",
        "operator.statusRecheckSeconds=5",
        f"nodeSelector.{key}=only",
        f"tolerations[0].key={REAL_NODE_ONLY}",
        "tolerations[0].operator=Exists",
        "tolerations[0].effect=NoSchedule",
        f"trainer.networkPolicy.dns.cidrs={{{dns}/32}}",
        f"trainer.networkPolicy.egressCIDRs={{{','.join(egress)}}}",
    ]


def progress_settings(port: int) -> list[str]:
    """The chart's progress values (``--set`` form) for an operator on a host-network node."""
    return [
        f"progress.port={port}",
        f"progress.url=https://127.0.0.1:{port}/v1/progress",
        "progress.tls.ipAddresses={127.0.0.1}",
    ]


def helm_set_args(settings: Sequence[str]) -> list[str]:
    """``["--set", s1, "--set", s2, ...]``."""
    return [arg for setting in settings for arg in ("--set", setting)]


def scrape_metrics(url: str, timeout: float = 10) -> dict[str, float]:
    """A Prometheus text endpoint as ``{'name{labels}': value}`` (tests and bench read the
    operator's /metrics through it)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 -- loopback
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def push_chart(
    helm: Callable[..., subprocess.CompletedProcess[str]], registry: Any, workdir: Path
) -> tuple[str, str, tuple[str, ...]]:
    """`make chart` into ``workdir``, then `helm push` of the package to ``registry`` (a
    kubetune_devtools.oci.LoginRegistry); returns the chart's oci:// reference, its version and
    the registry arguments helm needs to take it back."""
    version = yaml.safe_load((REPO / "charts" / "kubetune" / "Chart.yaml").read_text())["version"]
    packaged = subprocess.run(
        ["make", "--no-print-directory", "chart", f"CHART_DIR={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert packaged.returncode == 0, packaged.stderr
    package = workdir / f"kubetune-{version}.tgz"
    assert package.is_file(), packaged.stdout
    login = ("--plain-http", "--registry-config", str(registry.auth_file))
    pushed = helm("push", str(package), f"oci://{registry.host}/charts", *login)
    assert pushed.returncode == 0, pushed.stderr
    return f"oci://{registry.host}/charts/kubetune", version, login
