"""The operator as a process for the integration tests: started, killed, restarted, scraped.

It runs on the host, beside the local cluster; the trainers it makes run in containers on the
session's real node (``real_node``), from the tests' trainer image (``trainer_test_image``: the
trainer image plus the stand-in trainer), and report progress to it through a Service without a
selector whose endpoint is the host's side of the node's link (``host_service``): a real node's
pods have routes to pods and Services only (docs/local-cluster.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.local.certs import KeyPair, signed_cert
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.layout import Layout
from kubetune.local.ports import free_port
from kubetune_devtools.installs import real_node_state, scrape_metrics
from kubetune_devtools.pytest_plugin import (
    ClusterHandle,
    Kubectl,
    apply,
    get_json,
    run_kubectl,
    trainer_test_image_reference,
    wait_for,
)
from kubetune_devtools.tiny import tiny_cpu_settings

REPO = Path(__file__).resolve().parents[2]
#: The FineTuneJob CRD, applied by each suite before it starts the operator.
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
#: The PersistentVolumeClaim of ``work_claim``.
CLAIM = "work"
#: The tiny model's settings on the CPU: what every suite's tiny job (or the server's job
#: template) trains with, the spec's other sections aside.
TINY_SETTINGS: dict[str, Any] = {
    **tiny_cpu_settings(),
    "resources": {"gpus": 0, "shmSize": "64Mi"},
    "runPolicy": {"backoffLimit": 2},
}


@dataclass(frozen=True)
class ProgressTls:
    """The progress endpoint's serving certificate and the CA that signed it."""

    ca: KeyPair
    cert: KeyPair

    @property
    def ca_pem(self) -> str:
        return self.ca.cert.read_text()


_TLS: dict[tuple[str, ...], ProgressTls] = {}


def progress_tls(*addresses: str) -> ProgressTls:
    """One CA for every operator of the session, and a serving certificate for 127.0.0.1,
    localhost and ``addresses`` (IPs), made with openssl as the local cluster makes its own."""
    if addresses not in _TLS:
        ca = next(iter(_TLS.values())).ca if _TLS else _progress_ca()
        directory = ca.cert.parent
        cert = KeyPair.named(directory, f"progress-{len(_TLS)}")
        alt_names = ["IP:127.0.0.1", "DNS:localhost", *(f"IP:{a}" for a in addresses)]
        signed_cert(ca, cert, "/CN=kubetune-progress", usage="serverAuth", alt_names=alt_names)
        _TLS[addresses] = ProgressTls(ca, cert)
    return _TLS[addresses]


def _progress_ca() -> KeyPair:
    directory = Path(tempfile.mkdtemp(prefix="kubetune-progress-tls-"))
    ca = KeyPair.named(directory, "ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert), "-days", "30",
         "-subj", "/CN=kubetune-progress-test-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True, capture_output=True,
    )  # fmt: skip
    return ca


class OperatorProcess:
    """``kubetune-operator`` in a subprocess, logging to a file; it can be killed and restarted."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        progress_port: int | None = None,
        progress_host: str | None = None,
        cluster_home: Path | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        #: The local cluster's state directory (where ``kubeconfig`` sits unless given).
        self.cluster_home = cluster_home or kubeconfig.parent
        self.log_path = log_path
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.liveness_url = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics_port = free_port()
        #: Where trainers report progress (HTTPS); replicas given the same port share it
        #: (SO_REUSEPORT), as a Service shares the chart's replicas.
        self.progress_port = progress_port or free_port()
        #: The address trainers reach this process at: by default the ClusterIP of a Service
        #: (``host_service``, made at the first start) whose endpoint is the host's side of the
        #: session's real node's link.
        self.progress_host = progress_host
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def progress_url(self) -> str:
        """Where the trainers post progress (the Service's address, from the real node)."""
        return f"https://{self.progress_host}:{self.progress_port}/v1/progress"

    @property
    def host_progress_url(self) -> str:
        """The same endpoint as this host reaches it (it reaches no Service address)."""
        return f"https://127.0.0.1:{self.progress_port}/v1/progress"

    def start(self) -> None:
        if self.progress_host is None:
            self.progress_host = progress_service(self.cluster_home, self.progress_port)
        tls = progress_tls(*([self.progress_host] if self.progress_host != "127.0.0.1" else []))
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            # The operator's defaults for the trainer's security context (non-root, uid 1000,
            # fsGroup 1000): the real node enforces them.
            "KUBETUNE_LIVENESS_ENDPOINT": self.liveness_url,
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            # The suites read /metrics without a token; test_metrics_auth.py turns it on.
            "KUBETUNE_METRICS_AUTH": "false",
            # A replica killed without notice holds the Lease this long: keep restarts quick.
            "KUBETUNE_LEASE_DURATION_SECONDS": "4",
            "KUBETUNE_LEASE_RENEW_SECONDS": "1",
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "1",
            # Trainers (in pods of the real node) report to this process through the Service.
            "KUBETUNE_PROGRESS_PORT": str(self.progress_port),
            "KUBETUNE_PROGRESS_URL": self.progress_url,
            "KUBETUNE_PROGRESS_REUSE_PORT": "true",
            "KUBETUNE_PROGRESS_TLS_CERT_FILE": str(tls.cert.cert),
            "KUBETUNE_PROGRESS_TLS_KEY_FILE": str(tls.cert.key),
            "KUBETUNE_PROGRESS_CA_BUNDLE": tls.ca_pem,
            "KUBETUNE_STATUS_RECHECK_SECONDS": "5",
            "KUBETUNE_REFERENCE_RECHECK_SECONDS": "2",
            # The trainer image plus the stand-in (``trainer_test_image`` imports it).
            "KUBETUNE_TRAINER_IMAGE": trainer_test_image_reference(),
            "KUBETUNE_IMAGE_PULL_POLICY": "Never",
            # The trainers' NetworkPolicy (on, as by default) lets them reach the Services of
            # the tests' processes on the host (progress, datasets) behind the node's link,
            # which the default excepts with the rest of 10.0.0.0/8; the metadata address stays
            # out.
            "KUBETUNE_TRAINER_EGRESS_EXCEPT": "169.254.169.254/32",
            # Lifecycle jobs name a stand-in plan in their trainer's env (sleeper_spec); the
            # rest run the real trainer through the same command.
            "KUBETUNE_TRAINER_COMMAND": "kubetune-stand-in-trainer",
            "KUBETUNE_ALLOWED_POD_TEMPLATE_FIELDS": "containers.env",
            # The tests' dataset hosts serve behind Services (``host_service``), whose private
            # addresses trainers refuse by default.
            "KUBETUNE_TRAINER_DOWNLOAD_ALLOWED_CIDRS": SERVICE_RANGE,
            "KUBETUNE_ALLOWED_POD_TEMPLATE_ENV": "KUBETUNE_STAND_IN",
            "PYTHONUNBUFFERED": "1",
            "KUBETUNE_VERBOSE": os.environ.get("KUBETUNE_TEST_OPERATOR_VERBOSE", "false"),
            **self.extra_env,
        }
        operator = Path(sys.executable).with_name("kubetune-operator")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(operator), *self.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies under the operator."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def log_tail(self, lines: int = 60) -> str:
        lines = int(os.environ.get("KUBETUNE_TEST_OPERATOR_LOG_LINES", lines))
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def metrics(self) -> dict[str, float]:
        """The operator's /metrics as ``{'name{labels}': value}``."""
        return scrape_metrics(self.metrics_url, timeout=5)


def started(process: OperatorProcess) -> Iterator[OperatorProcess]:
    """The body of an ``operator`` fixture (``yield from started(...)``): ``process`` runs for
    the fixture's tests and is stopped after them."""
    process.start()
    yield process
    process.stop()


def log_tail_after(process: OperatorProcess) -> Iterator[None]:
    """The body of an autouse fixture (``yield from log_tail_after(operator)``): after each test,
    ``process``'s log tail, in the captured output pytest shows for a failing test."""
    yield
    print(f"--- operator log (tail) ---\n{process.log_tail()}")


def work_claim(kubectl: Kubectl, namespace: str) -> Path:
    """A bound PVC named ``work`` (``CLAIM``); the directory behind it on this machine."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    apply(kubectl, namespace, claim)
    volume = wait_for(
        lambda: get_json(kubectl, "pvc", CLAIM, "-n", namespace)["spec"].get("volumeName"),
        60,
        "the work claim to bind",
    )
    pv = get_json(kubectl, "pv", volume)
    return Path(pv["spec"]["hostPath"]["path"])


#: The local cluster's Service range (ClusterIPs): where trainers find the tests' host servers.
SERVICE_RANGE = "10.0.0.0/24"


def progress_service(cluster_home: Path, port: int) -> str:
    """The ClusterIP of ``operator-progress-<port>``: ``host_port_service`` for an operator's
    progress port."""
    return host_port_service(cluster_home, f"operator-progress-{port}", port)


def host_port_service(cluster_home: Path, name: str, port: int) -> str:
    """The ClusterIP of Service ``name`` (``host_service``): the host's ``port`` behind the
    session's real node's link, in the local cluster of ``cluster_home``."""
    layout = Layout(cluster_home)
    handle = ClusterHandle(
        layout.kubeconfig, Path(ClusterInfo.load(layout).bin_dir) / "kubectl", None, owned=False
    )

    def kubectl(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run_kubectl(handle, args, input, check, timeout)

    host = real_node_state(layout.home).host_address
    return host_service(kubectl, name, host, port)


def host_service(kubectl: Kubectl, name: str, host_address: str, port: int) -> str:
    """A Service ``name`` (namespace ``default``) without a selector whose EndpointSlice is
    ``host_address:port``: how a real node's pods reach a process of the host (their routes
    lead to pods and Services only, docs/local-cluster.md); its ClusterIP."""
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"ports": [{"name": "https", "port": port, "targetPort": port}]},
    }  # fmt: skip
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [host_address]}],
    }  # fmt: skip
    apply(kubectl, "default", service, endpoints)
    return str(get_json(kubectl, "service", name, "-n", "default")["spec"]["clusterIP"])
