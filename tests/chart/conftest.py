"""Fixtures for the chart, image and GitOps tests: ``helm template`` rendered into parsed
objects. The helm CLI and the cluster fixtures (local_cluster, kubectl, namespace, ...) come from
tests/conftest.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import yaml
from chartkit import CHART, Helm, Render


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
