"""Finds (building on first use) the control plane binaries made by hack/cluster/build.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


class BinariesError(RuntimeError):
    """The binaries are neither configured nor buildable here."""


def build_script() -> Path:
    """hack/cluster/build.sh of the source tree this package is installed from."""
    return Path(__file__).resolve().parent.parent / "hack" / "cluster" / "build.sh"


def binaries_dir() -> Path:
    """Directory holding all of ``BINARIES``.

    ``$KUBETUNE_CLUSTER_BIN_DIR`` wins (for prebuilt binaries); otherwise the build
    script runs, which returns at once when its cache already holds this pin.
    """
    configured = os.environ.get("KUBETUNE_CLUSTER_BIN_DIR")
    if configured:
        directory = Path(configured)
    else:
        script = build_script()
        if not script.exists():
            raise BinariesError(
                f"{script} not found: install kubetune from its source tree, or set "
                "KUBETUNE_CLUSTER_BIN_DIR to a directory with " + ", ".join(BINARIES)
            )
        # Build progress goes to our stderr so a first, long build is visible.
        result = subprocess.run(
            ["bash", str(script)], check=False, stdout=subprocess.PIPE, stderr=sys.stderr, text=True
        )
        if result.returncode != 0:
            raise BinariesError(f"{script} failed with exit code {result.returncode}")
        directory = Path(result.stdout.strip().splitlines()[-1])
    missing = [name for name in BINARIES if not (directory / name).exists()]
    if missing:
        raise BinariesError(f"{directory} lacks {', '.join(missing)}")
    return directory
