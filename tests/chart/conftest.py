"""Fixtures for the chart, image and GitOps tests: the helm CLI (built from its Go module by
hack/helm/build.sh, cached) and ``helm template`` rendered into parsed objects. The cluster
fixtures (local_cluster, kubectl, namespace, ...) come from tests/conftest.py."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, REPO, Helm, Render


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    """The helm CLI, built from hack/helm's go.mod on the first use on a machine."""
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "helm" / "build.sh")],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"hack/helm/build.sh failed:\n{result.stderr}"
    binary = Path(result.stdout.strip().splitlines()[-1])
    assert binary.is_file(), binary
    return binary


@pytest.fixture(scope="session")
def helm(helm_binary: Path) -> Helm:
    """Run helm: ``helm("lint", str(CHART))``; returns the completed process, never raises."""

    def run(*args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            [str(helm_binary), *args], capture_output=True, text=True, timeout=timeout,
            check=False, env=env,
        )  # fmt: skip

    return run


@pytest.fixture(scope="session")
def render(helm: Helm) -> Render:
    """``helm template`` the chart: ``render("-f", values, "--set", "a=b")`` → list of objects."""

    def run(*args: str, release: str = "kt", namespace: str = "kubetune-system",
            include_crds: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        extra: Sequence[str] = ("--include-crds",) if include_crds else ()
        result = helm("template", release, str(CHART), "--namespace", namespace, *extra, *args)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run
