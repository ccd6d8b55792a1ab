"""Self-signed PKI for the local control plane, made with the openssl CLI.

The cluster only ever listens on loopback, so one CA signs everything: the
apiserver's serving certificate, the admin client certificate (group
system:masters), the client certificate the apiserver presents to the kubelets
(a real node's serving certificate is made with its state, ``real_node``), and Kueue's (its
webhook and metrics servers, where it runs). The service-account key pair signs and verifies
projected tokens.
"""

from __future__ import annotations

import secrets
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DAYS = "3650"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path

    @classmethod
    def named(cls, directory: Path, name: str) -> KeyPair:
        return cls(directory / f"{name}.crt", directory / f"{name}.key")


class Pki:
    """Paths of every key and certificate the control plane uses, under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = KeyPair.named(directory, "ca")
        self.apiserver = KeyPair.named(directory, "apiserver")
        #: Group system:masters.
        self.admin = KeyPair.named(directory, "admin")
        #: What the apiserver presents to the kubelets (``kubectl logs``, ``exec``).
        self.kubelet_client = KeyPair.named(directory, "apiserver-kubelet-client")
        #: What Kueue's webhook and metrics servers serve with (``ensure_kueue_serving``).
        self.kueue_serving = KeyPair.named(directory, "kueue-serving")
        #: What JobSet's webhook server serves with (``ensure_jobset_serving``).
        self.jobset_serving = KeyPair.named(directory, "jobset-serving")
        self.service_account_key = directory / "sa.key"
        self.service_account_pub = directory / "sa.pub"
        #: A bearer token for the admin (group system:masters), for curl and friends.
        self.admin_token = directory / "admin.token"
        #: The apiserver's --token-auth-file (CSV: token,user,uid,"groups").
        self.token_auth_file = directory / "tokens.csv"

    def admin_context(self) -> ssl.SSLContext:
        """TLS as the admin: trusts the cluster's CA, presents the admin certificate."""
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(path: Path) -> None:
    # P-256 rather than RSA: key generation is instant, and every component
    # (including service-account token signing, ES256) accepts it.
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


def signed_cert(
    ca: KeyPair,
    pair: KeyPair,
    subject: str,
    *,
    usage: str,
    alt_names: list[str] | None = None,
) -> None:
    _new_key(pair.key)
    extensions = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if alt_names:
        extensions.append("subjectAltName=" + ",".join(alt_names))
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "req.csr"
        ext = Path(tmp) / "ext.cnf"
        ext.write_text("\n".join(extensions) + "\n")
        _openssl("req", "-new", "-key", str(pair.key), "-subj", subject, "-out", str(csr))
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca.cert),
            "-CAkey",
            str(ca.key),
            "-CAcreateserial",
            "-days",
            _DAYS,
            "-sha256",
            "-extfile",
            str(ext),
            "-out",
            str(pair.cert),
        )


def ensure_pki(directory: Path) -> Pki:
    """Create the PKI under ``directory`` unless it is already there (idempotent)."""
    pki = Pki(directory)
    if pki.token_auth_file.exists():
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    _new_key(pki.ca.key)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        str(pki.ca.key),
        "-subj",
        "/CN=kubetune-local-ca",
        "-days",
        _DAYS,
        "-sha256",
        "-out",
        str(pki.ca.cert),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )
    signed_cert(
        pki.ca,
        pki.apiserver,
        "/CN=kube-apiserver",
        usage="serverAuth",
        alt_names=[
            "IP:127.0.0.1",
            "IP:10.0.0.1",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ],
    )
    signed_cert(
        pki.ca,
        pki.admin,
        "/O=system:masters/CN=kubetune-admin",
        usage="clientAuth",
    )
    signed_cert(
        pki.ca,
        pki.kubelet_client,
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        usage="clientAuth",
    )
    _new_key(pki.service_account_key)
    _openssl(
        "pkey", "-in", str(pki.service_account_key), "-pubout", "-out", str(pki.service_account_pub)
    )
    token = secrets.token_hex(32)
    pki.admin_token.write_text(token + "\n")
    pki.admin_token.chmod(0o600)
    # Written last: its presence says the whole PKI is complete.
    pki.token_auth_file.write_text(f'{token},kubetune-admin,kubetune-admin,"system:masters"\n')
    pki.token_auth_file.chmod(0o600)
    return pki


def ensure_kueue_serving(pki: Pki) -> KeyPair:
    """Kueue's serving certificate, signed by the cluster's CA, made on first use: a cluster
    started without Kueue gets it when Kueue first starts."""
    return _ensure_serving(pki, pki.kueue_serving, "kueue")


def ensure_jobset_serving(pki: Pki) -> KeyPair:
    """JobSet's serving certificate (its webhook server, which no apiserver calls here, still
    starts and serves), made on first use like Kueue's."""
    return _ensure_serving(pki, pki.jobset_serving, "jobset")


def _ensure_serving(pki: Pki, pair: KeyPair, name: str) -> KeyPair:
    if not pair.cert.exists():
        signed_cert(
            pki.ca,
            pair,
            f"/CN={name}",
            usage="serverAuth",
            alt_names=["IP:127.0.0.1", "DNS:localhost"],
        )
    return pair
