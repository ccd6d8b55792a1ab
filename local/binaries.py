"""Finds (building on first use) the control plane binaries made by hack/cluster/build.sh, a real
node's by hack/node/build.sh,
Kueue's manager and CRDs made by hack/kueue/build.sh, JobSet's by hack/jobset/build.sh, and the
OCI registry and oras CLI by hack/registry/build.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
#: What hack/kueue/build.sh leaves in its directory: the manager, and the module's CRDs.
KUEUE_FILES = ("kueue", "crds")
#: What hack/jobset/build.sh leaves in its directory: the manager, and the module's CRD.
JOBSET_FILES = ("jobset", "crds")
#: What hack/registry/build.sh leaves in its directory: distribution's registry and oras.
REGISTRY_FILES = ("registry", "oras")


class BinariesError(RuntimeError):
    """The binaries are neither configured nor buildable here."""


def build_script(component: str = "cluster") -> Path:
    """hack/<component>/build.sh of the source tree this package is installed from."""
    return Path(__file__).resolve().parent.parent / "hack" / component / "build.sh"


def _built(component: str, variable: str, names: tuple[str, ...]) -> Path:
    """The directory holding ``names``: ``$variable`` when set (prebuilt), otherwise what
    hack/<component>/build.sh prints, which returns at once when its cache holds this pin."""
    configured = os.environ.get(variable)
    if configured:
        directory = Path(configured)
    else:
        script = build_script(component)
        if not script.exists():
            raise BinariesError(
                f"{script} not found: install kubetune from its source tree, or set "
                f"{variable} to a directory with " + ", ".join(names)
            )
        # Build progress goes to our stderr so a first, long build is visible.
        result = subprocess.run(
            ["bash", str(script)], check=False, stdout=subprocess.PIPE, stderr=sys.stderr, text=True
        )
        if result.returncode != 0:
            raise BinariesError(f"{script} failed with exit code {result.returncode}")
        directory = Path(result.stdout.strip().splitlines()[-1])
    missing = [name for name in names if not (directory / name).exists()]
    if missing:
        raise BinariesError(f"{directory} lacks {', '.join(missing)}")
    return directory


def binaries_dir() -> Path:
    """Directory holding all of ``BINARIES``.

    ``$KUBETUNE_CLUSTER_BIN_DIR`` wins (for prebuilt binaries); otherwise hack/cluster/build.sh
    runs.
    """
    return _built("cluster", "KUBETUNE_CLUSTER_BIN_DIR", BINARIES)


def kueue_dir() -> Path:
    """Directory holding Kueue's manager (``kueue``) and its CRDs (``crds/*.yaml``), both from
    the Go module hack/kueue pins.

    ``$KUBETUNE_KUEUE_DIR`` wins (prebuilt); otherwise hack/kueue/build.sh runs.
    """
    return _built("kueue", "KUBETUNE_KUEUE_DIR", KUEUE_FILES)


def jobset_dir() -> Path:
    """Directory holding JobSet's controller manager (``jobset``) and its CRD
    (``crds/*.yaml``), both from the Go module hack/jobset pins.

    ``$KUBETUNE_JOBSET_DIR`` wins (prebuilt); otherwise hack/jobset/build.sh runs.
    """
    return _built("jobset", "KUBETUNE_JOBSET_DIR", JOBSET_FILES)


def registry_dir() -> Path:
    """Directory holding an OCI registry (``registry``, distribution's) and the ``oras`` CLI,
    both from the Go modules hack/registry pins.

    ``$KUBETUNE_REGISTRY_DIR`` wins (prebuilt); otherwise hack/registry/build.sh runs.
    """
    return _built("registry", "KUBETUNE_REGISTRY_DIR", REGISTRY_FILES)


#: What hack/node/build.sh leaves in its directory: a real node's binaries.
NODE_FILES = (
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "runc",
    "pause",
    "coredns",
    "kube-router",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "cni/portmap",
)


def node_dir() -> Path:
    """Directory holding a real node's binaries (``NODE_FILES``): kubelet and kube-proxy,
    containerd, runc, the CNI plugins, pause, CoreDNS and kube-router, each from the Go module
    hack/node pins.

    ``$KUBETUNE_NODE_BIN_DIR`` wins (prebuilt); otherwise hack/node/build.sh runs.
    """
    return _built("node", "KUBETUNE_NODE_BIN_DIR", NODE_FILES)
