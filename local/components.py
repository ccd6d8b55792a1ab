"""The control plane's components as command lines, and the admin kubeconfig they share: pure
functions of the cluster's ports, state directory and PKI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.local.certs import KeyPair, Pki
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.layout import Layout

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
#: The Services' ClusterIPs; the apiserver's own Service, ``kubernetes``, gets the first.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


def _binary(info: ClusterInfo, name: str) -> str:
    return str(Path(info.bin_dir) / name)


def etcd_argv(info: ClusterInfo, layout: Layout) -> list[str]:
    client = f"http://127.0.0.1:{info.etcd_port}"
    peer = f"http://127.0.0.1:{info.etcd_peer_port}"
    return [
        _binary(info, "etcd"),
        "--name=kubetune",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kubetune={peer}",
        # A throwaway development cluster: durability is not worth the fsync latency.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_argv(info: ClusterInfo, layout: Layout, pki: Pki) -> list[str]:
    return [
        _binary(info, "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{info.etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={info.apiserver_port}",
        f"--cert-dir={layout.pki}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--token-auth-file={pki.token_auth_file}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        # The 'kubernetes' Service would get a loopback endpoint, which validation
        # rejects; pods reach the apiserver through KUBERNETES_SERVICE_HOST instead.
        "--endpoint-reconciler-type=none",
        # `kubectl logs` and `exec` are proxied to the kubelet's HTTPS server on its InternalIP.
        f"--kubelet-client-certificate={pki.kubelet_client.cert}",
        f"--kubelet-client-key={pki.kubelet_client.key}",
        # Real nodes' kubelets serve with a certificate from the same CA.
        f"--kubelet-certificate-authority={pki.ca.cert}",
        "--kubelet-preferred-address-types=InternalIP",
        "--profiling=false",
        "--v=1",
    ]


def _apiserver_client_argv(info: ClusterInfo, layout: Layout, name: str, *flags: str) -> list[str]:
    """A component that talks to the apiserver as admin, alone (no leader election) and with its
    own HTTPS endpoint switched off."""
    kubeconfig = str(layout.kubeconfig)
    return [
        _binary(info, name),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        *flags,
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        "--secure-port=0",
        "--v=1",
    ]


def controller_manager_argv(info: ClusterInfo, layout: Layout, pki: Pki) -> list[str]:
    return _apiserver_client_argv(
        info,
        layout,
        "kube-controller-manager",
        # The defaults ('*') include job, garbage-collector, namespace, serviceaccount,
        # serviceaccount-token, root-ca-cert-publisher, persistentvolume-binder,
        # ttl-after-finished, node-lifecycle and pod-garbage-collector.
        "--controllers=*",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        "--use-service-account-credentials=false",
    )


def scheduler_argv(info: ClusterInfo, layout: Layout) -> list[str]:
    return _apiserver_client_argv(info, layout, "kube-scheduler")


def admin_kubeconfig(info: ClusterInfo, pki: Pki) -> dict[str, Any]:
    """The admin's kubeconfig (context ``kubetune-local``, namespace ``default``)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-local",
                "cluster": {"server": info.server, "certificate-authority": str(pki.ca.cert)},
            }
        ],
        "users": [
            {
                "name": "kubetune-admin",
                "user": {
                    "client-certificate": str(pki.admin.cert),
                    "client-key": str(pki.admin.key),
                },
            }
        ],
        "contexts": [
            {
                "name": "kubetune-local",
                "context": {
                    "cluster": "kubetune-local",
                    "user": "kubetune-admin",
                    "namespace": "default",
                },
            }
        ],
        "current-context": "kubetune-local",
    }


# Where Kueue's manager finds its files inside its sandbox (``kueue_argv``). With
# internalCertManagement off it reads its metrics certificate from this fixed path, so it runs in
# a bubblewrap sandbox whose root is an empty tmpfs: the files are bound in there, and nothing is
# written to the host's /etc.
KUEUE_CONFIG_PATH = "/etc/kueue/config.yaml"
KUEUE_METRICS_CERT_DIR = "/etc/kueue/metrics/certs"  # fixed in Kueue's cmd/kueue/main.go
KUEUE_WEBHOOK_CERT_DIR = "/etc/kueue/webhook/certs"


def kueue_config(health_port: int, webhook_port: int, *, jobset: bool = False) -> dict[str, Any]:
    """Kueue's Configuration for the local cluster: batch/v1 Jobs that name a LocalQueue
    (``kueue.x-k8s.io/queue-name``) are admitted by quota, every other Job is left alone; with
    ``jobset`` (JobSet's CRD is installed) JobSets too, all their Jobs' pods as one Workload.

    One replica, so no leader election; certificates come from the cluster's CA (no internal
    certificate management, which would want webhook configurations to patch). The webhook server
    listens on loopback but is registered with no apiserver: the operator creates queued Jobs
    suspended and labelled, which is all Kueue's Job webhook would have done for them. The metrics
    server and the on-demand visibility API server are off (fixed ports clash between clusters).
    """
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "manageJobsWithoutQueueName": False,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": KUEUE_WEBHOOK_CERT_DIR},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": kueue_frameworks(jobset=jobset)},
        "featureGates": {"VisibilityOnDemand": False},
    }


def kueue_frameworks(*, jobset: bool) -> list[str]:
    """The job kinds Kueue admits: Jobs, and JobSets where JobSet's CRD is installed."""
    return ["batch/job", *(["jobset.x-k8s.io/jobset"] if jobset else [])]


def kueue_argv(kueue: Path, layout: Layout, pki: Pki) -> list[str]:
    """Kueue's manager in its sandbox (``_manager_argv``); its serving certificate serves both
    its metrics and its webhook server."""
    config = (layout.kueue_config, KUEUE_CONFIG_PATH)
    cert_dirs = (KUEUE_METRICS_CERT_DIR, KUEUE_WEBHOOK_CERT_DIR)
    return _manager_argv(
        kueue, config=config, cert_dirs=cert_dirs, layout=layout, serving=pki.kueue_serving, pki=pki
    )


def _manager_argv(
    binary: Path,
    *,
    config: tuple[Path, str],
    cert_dirs: tuple[str, ...],
    layout: Layout,
    serving: KeyPair,
    pki: Pki,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A controller manager (Kueue's, JobSet's) in its sandbox: an empty root with the binary, its
    configuration (``config``: the file, and where the manager reads it), the admin kubeconfig
    and the PKI bound in read-only, and ``serving``'s certificate and key as ``tls.crt`` and
    ``tls.key`` in each of ``cert_dirs``. It talks to the apiserver as admin, so the project's
    own RBAC is not needed here."""
    argv = ["bwrap", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for path in (binary, layout.kubeconfig, pki.directory):
        argv += ["--ro-bind", str(path), str(path)]
    config_file, config_path = config
    argv += ["--ro-bind", str(config_file), config_path]
    for directory in cert_dirs:
        argv += ["--ro-bind", str(serving.cert), f"{directory}/tls.crt"]
        argv += ["--ro-bind", str(serving.key), f"{directory}/tls.key"]
    return [
        *argv,
        "--",
        str(binary),
        f"--config={config_path}",
        f"--kubeconfig={layout.kubeconfig}",
        *extra,
    ]


# Where JobSet's manager finds its files inside its sandbox (``jobset_argv``).
JOBSET_CONFIG_PATH = "/etc/jobset/config.yaml"
JOBSET_WEBHOOK_CERT_DIR = "/etc/jobset/webhook/certs"


def jobset_config(health_port: int, webhook_port: int) -> dict[str, Any]:
    """JobSet's Configuration for the local cluster, the way Kueue's is: one replica (no leader
    election), no internal certificate management (it would want webhook configurations and a
    Secret to patch), the webhook server on loopback with a certificate from the cluster's CA
    but registered with no apiserver, no metrics server. Without its webhooks nothing defaults
    or validates a JobSet: kubetune renders every field the defaulting webhook would set and
    keeps the names within what the validating one checks (``operator/render.py``)."""
    return {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": JOBSET_WEBHOOK_CERT_DIR},
        "internalCertManagement": {"enable": False},
    }


def jobset_argv(jobset: Path, layout: Layout, pki: Pki) -> list[str]:
    """JobSet's manager in its sandbox, as Kueue's (``_manager_argv``)."""
    config = (layout.jobset_config, JOBSET_CONFIG_PATH)
    cert_dirs = (JOBSET_WEBHOOK_CERT_DIR,)
    return _manager_argv(
        jobset,
        config=config,
        cert_dirs=cert_dirs,
        layout=layout,
        serving=pki.jobset_serving,
        pki=pki,
        extra=("--zap-devel=false",),
    )
