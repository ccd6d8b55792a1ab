"""Paths and small helpers shared by the chart tests (a unique module name: every test folder
has its own conftest.py, so nothing is imported from one)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))

Render = Callable[..., list[dict[str, Any]]]
Helm = Callable[..., subprocess.CompletedProcess[str]]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
