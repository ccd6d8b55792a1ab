"""Shared test set-up: the real local cluster's fixtures (kubetune_devtools.pytest_plugin) and the helm
CLI for the chart and e2e suites; each suite's own fixtures live in its folder's conftest."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["kubetune_devtools.pytest_plugin"]

REPO = Path(__file__).resolve().parents[1]
#: The environment the builds run in, as the session started (the trainer suite later points
#: KUBETUNE_CACHE_DIR at a temporary folder for its own caches).
_BUILD_ENV = dict(os.environ)


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
def helm(helm_binary: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run helm: ``helm("lint", str(CHART))``; returns the completed process, never raises."""

    def run(*args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            [str(helm_binary), *args], capture_output=True, text=True, timeout=timeout,
            check=False, env=env,
        )  # fmt: skip

    return run


@pytest.fixture(scope="session")
def registry_tools() -> Path:
    """distribution's registry and the oras CLI, built from hack/registry's go.mod on the first
    use on a machine."""
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "registry" / "build.sh")],
        capture_output=True, text=True, timeout=1800, check=False, env=_BUILD_ENV,
    )  # fmt: skip
    assert result.returncode == 0, f"hack/registry/build.sh failed:\n{result.stderr}"
    directory = Path(result.stdout.strip().splitlines()[-1])
    assert (directory / "registry").is_file() and (directory / "oras").is_file(), directory
    return directory


@pytest.fixture
def oci_registry(registry_tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A registry of its own on loopback that asks for a login (TestRegistry: host, auth_file,
    oras)."""
    from kubetune_devtools.oci import running_test_registry

    with running_test_registry(tmp_path_factory.mktemp("oci"), registry_tools) as registry:
        yield registry


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model and the toy datasets, built once per session (nothing is downloaded)."""
    from kubetune_devtools.tiny import write_tiny_model, write_toy_datasets

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_model(root / "model")
    write_toy_datasets(root / "data", count=64)
    # Readable by every uid: tests copy these (modes included) onto claims, where trainers of
    # the real node read them as the trainer's non-root user.
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root
