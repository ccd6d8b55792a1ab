"""Where the local cluster keeps its state: one directory, ``$KUBETUNE_HOME``."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``$KUBETUNE_HOME``, or ``~/.kubetune/local``."""
    configured = os.environ.get("KUBETUNE_HOME")
    return Path(configured) if configured else Path.home() / ".kubetune" / "local"


class Layout:
    """Paths inside one cluster's state directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.kubeconfig = home / "kubeconfig"
        #: Ports and binaries of the running cluster (JSON), written by ``up``.
        self.cluster_file = home / "cluster.json"
        self.pki = home / "pki"
        self.etcd_data = home / "etcd"
        self.logs = home / "logs"
        #: Pid files of supervised processes.
        self.run = home / "run"
        #: Directories backing the provisioner's PersistentVolumes.
        self.volumes = home / "volumes"
        #: Kueue's Configuration file, where Kueue runs.
        self.kueue_config = home / "kueue-config.yaml"
        #: JobSet's Configuration file, where JobSet runs.
        self.jobset_config = home / "jobset-config.yaml"
        #: The OCI registry's configuration and storage (``kubetune local up --registry``).
        self.registry_config = home / "registry-config.yml"
        self.registry_storage = home / "registry"

    def create(self) -> None:
        for directory in (self.home, self.logs, self.run, self.volumes):
            directory.mkdir(parents=True, exist_ok=True)
