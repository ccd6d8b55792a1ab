"""How the tests install kubetune on the local cluster: helm's environment and ``--set``
values, the images built from the Dockerfile, and the operator's Prometheus endpoint."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from kubetune.local.ports import free_port
from kubetune_devtools.pytest_plugin import IMAGES_ONLY


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


def image_node_chart_settings() -> list[str]:
    """The chart's values (``--set`` form) for an operator running from its image on
    ``image_node``, with quick status; the trainer keeps the chart's security context."""
    key = IMAGES_ONLY.replace(".", "\\.")
    return [
        f"operator.healthPort={free_port()}",  # the local node's pods share the host network
        f"operator.metricsPort={free_port()}",
        # Trainers on the host-network node reach the operator's progress port on loopback (no
        # Service routing there), so the chart's certificate names that address.
        *progress_settings(free_port()),
        "replicaCount=1",  # replicas on one host-network node would share those ports
        "operator.jsonLogs=false",
        "operator.progressIntervalSeconds=1",
        "operator.statusRecheckSeconds=5",
        f"nodeSelector.{key}=only",
        f"tolerations[0].key={IMAGES_ONLY}",
        "tolerations[0].operator=Exists",
        "tolerations[0].effect=NoSchedule",
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
