"""What ``kubetune local up`` chose for one cluster (ports, binaries, nodes), persisted as
``cluster.json`` in its state directory for ``status`` and tests."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from kubetune.local.layout import Layout


@dataclass
class ClusterInfo:
    """The running cluster's ports and binaries."""

    home: str
    bin_dir: str
    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int
    node_names: list[str] = field(default_factory=list)
    #: Where Kueue runs beside the control plane (``start_kueue``): its build directory and the
    #: port of its health probes; empty and 0 without Kueue.
    kueue_dir: str = ""
    kueue_health_port: int = 0
    #: The same for JobSet's controller (``start_jobset``).
    jobset_dir: str = ""
    jobset_health_port: int = 0
    #: The OCI registry's port on 127.0.0.1 (``start_registry``); 0 without one.
    registry_port: int = 0

    @property
    def registry_host(self) -> str:
        """What an ``oci://`` URI names for the local registry (empty without one)."""
        return f"127.0.0.1:{self.registry_port}" if self.registry_port else ""

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @classmethod
    def load(cls, layout: Layout) -> ClusterInfo:
        return cls(**json.loads(layout.cluster_file.read_text()))

    def save(self, layout: Layout) -> None:
        layout.cluster_file.write_text(json.dumps(asdict(self), indent=2) + "\n")
