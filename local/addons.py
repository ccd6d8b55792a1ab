"""What the local cluster starts beside its control plane when asked: Kueue's manager, JobSet's
controller (each with its CRDs, from the Go modules hack/kueue and hack/jobset pin) and an OCI
registry, each started once and probed until ready.
"""

from __future__ import annotations

import json
import time
import urllib.request

from kubetune.local import components
from kubetune.local.binaries import jobset_dir, kueue_dir, registry_dir
from kubetune.local.certs import ensure_jobset_serving, ensure_kueue_serving
from kubetune.local.cluster_access import ClusterAccess, ClusterError
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.ports import free_port

KUEUE = "kueue"
JOBSET = "jobset"
REGISTRY = "registry"
#: JobSet's CRD, as the apiserver serves it.
JOBSET_CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/jobsets.jobset.x-k8s.io"


class AddOns(ClusterAccess):
    """Starting Kueue, JobSet's controller and the registry beside a running control plane."""

    def start_add_ons(self, timeout: float, *, registry: bool, jobset: bool, kueue: bool) -> None:
        """Start the add-ons asked for, unless they run already."""
        if registry:
            self.start_registry(timeout)
        # JobSet first: Kueue admits JobSets only if their CRD is there when it starts.
        if jobset:
            self.start_jobset(timeout)
        if kueue:
            self.start_kueue(timeout)

    def start_kueue(self, timeout: float = 120.0) -> None:
        """Install Kueue's CRDs and start its manager beside the running control plane, unless
        it runs already. Both come from the Go module hack/kueue pins (built on first use).
        Where JobSet's CRD is installed Kueue admits JobSets too; a Kueue started before it was
        is started again to take them on."""
        process = self.process(KUEUE)
        jobset = self.get(JOBSET_CRD_PATH)[0] == 200
        frameworks = components.kueue_frameworks(jobset=jobset)
        if process.pid() is not None:
            if self._kueue_frameworks() == frameworks:
                return
            process.stop()
        directory = kueue_dir()
        crds = str(directory / "crds")
        # Server-side: the CRDs are too large for client-side apply's annotation.
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds)
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "-f", crds)
        ensure_kueue_serving(self.pki)
        info = ClusterInfo.load(self.layout)
        info.kueue_dir = str(directory)
        info.kueue_health_port = free_port()
        config = components.kueue_config(
            info.kueue_health_port, webhook_port=free_port(), jobset=jobset
        )
        # JSON is valid YAML.
        self.layout.kueue_config.write_text(json.dumps(config, indent=2) + "\n")
        info.save(self.layout)
        self._start(KUEUE, components.kueue_argv(directory / "kueue", self.layout, self.pki))
        self._wait(lambda: self.kueue_ready(info), "Kueue /readyz", timeout, KUEUE)

    def _kueue_frameworks(self) -> list[str] | None:
        """The integrations the running Kueue was started with."""
        try:
            config = json.loads(self.layout.kueue_config.read_text())
        except (OSError, ValueError):
            return None
        frameworks = config.get("integrations", {}).get("frameworks")
        return list(frameworks) if isinstance(frameworks, list) else None

    def start_jobset(self, timeout: float = 120.0) -> None:
        """Install JobSet's CRD and start its controller beside the running control plane,
        unless it runs already. Both come from the Go module hack/jobset pins (built on first
        use). Its webhooks are registered with no apiserver (``components.jobset_config``). A
        Kueue running already is started again to admit JobSets."""
        process = self.process(JOBSET)
        if process.pid() is None:
            directory = jobset_dir()
            crds = str(directory / "crds")
            # Server-side: the CRD is too large for client-side apply's annotation.
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds)
            # Polled, not `kubectl wait`: that fails on a CRD whose conditions aren't set yet.
            deadline = time.monotonic() + timeout
            while not self._jobset_crd_established():
                if time.monotonic() > deadline:
                    raise ClusterError(f"JobSet's CRD not Established after {timeout:.0f}s")
                time.sleep(0.25)
            ensure_jobset_serving(self.pki)
            info = ClusterInfo.load(self.layout)
            info.jobset_dir = str(directory)
            info.jobset_health_port = free_port()
            config = components.jobset_config(info.jobset_health_port, webhook_port=free_port())
            self.layout.jobset_config.write_text(json.dumps(config, indent=2) + "\n")
            info.save(self.layout)
            self._start(JOBSET, components.jobset_argv(directory / "jobset", self.layout, self.pki))
            self._wait(lambda: self.jobset_ready(info), "JobSet /readyz", timeout, JOBSET)
        if self.process(KUEUE).pid() is not None:
            self.start_kueue(timeout)

    def start_registry(self, timeout: float = 120.0) -> None:
        """Start an OCI registry (distribution's, from the Go module hack/registry pins) on
        127.0.0.1 beside the cluster, unless it runs already: plain http, no login, its blobs
        under the state directory (kept by ``down``, removed by ``down --purge``)."""
        from kubetune.local.registry import registry_config, wait_until_answering

        process = self.process(REGISTRY)
        if process.pid() is not None:
            return
        directory = registry_dir()
        info = ClusterInfo.load(self.layout)
        info.registry_port = info.registry_port or free_port()
        config = registry_config(info.registry_port, self.layout.registry_storage)
        self.layout.registry_config.write_text(json.dumps(config, indent=2) + "\n")
        info.save(self.layout)
        self._start(
            REGISTRY, [str(directory / "registry"), "serve", str(self.layout.registry_config)]
        )
        try:
            wait_until_answering(info.registry_port, timeout, process.exited_early)
        except RuntimeError as exc:
            raise ClusterError(f"{exc}; see {process.log_file}") from None

    def kueue_ready(self, info: ClusterInfo | None = None) -> bool:
        """Kueue's manager answers its readiness probe (caches synced, webhook server up)."""
        return _probe_ready((info or ClusterInfo.load(self.layout)).kueue_health_port)

    def _jobset_crd_established(self) -> bool:
        status, body = self.get(JOBSET_CRD_PATH)
        if status != 200:
            return False
        conditions = json.loads(body).get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def jobset_ready(self, info: ClusterInfo | None = None) -> bool:
        """JobSet's manager answers its readiness probe (its webhook server is up)."""
        return _probe_ready((info or ClusterInfo.load(self.layout)).jobset_health_port)


def _probe_ready(port: int | None) -> bool:
    """A controller manager's health server on loopback ``port`` answers /readyz with 200."""
    if not port:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False
