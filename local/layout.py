"""Where the local cluster keeps its state: one directory, ``$KUBETUNE_HOME``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    """``$KUBETUNE_HOME``, or ``~/.kubetune/local``."""
    configured = os.environ.get("KUBETUNE_HOME")
    return Path(configured) if configured else Path.home() / ".kubetune" / "local"


@dataclass(frozen=True)
class Layout:
    """Paths inside one cluster's state directory."""

    home: Path

    @property
    def kubeconfig(self) -> Path:
        return self.home / "kubeconfig"

    @property
    def cluster_file(self) -> Path:
        """Ports and binaries of the running cluster (JSON), written by ``up``."""
        return self.home / "cluster.json"

    @property
    def pki(self) -> Path:
        return self.home / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.home / "etcd"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        """Pid files of supervised processes."""
        return self.home / "run"

    @property
    def nodes(self) -> Path:
        """One directory per node agent: its pods' volumes, logs and termination files."""
        return self.home / "nodes"

    @property
    def volumes(self) -> Path:
        """Directories backing the provisioner's PersistentVolumes."""
        return self.home / "volumes"

    def create(self) -> None:
        for directory in (self.home, self.logs, self.run, self.nodes, self.volumes):
            directory.mkdir(parents=True, exist_ok=True)
