"""Self-signed PKI for the local control plane, made with the openssl CLI.

The cluster only ever listens on loopback, so one CA signs everything: the
apiserver's serving certificate, the admin client certificate (group
system:masters), the client certificate the apiserver presents to node agents,
and the node agents' serving certificates. The service-account key pair signs
and verifies projected tokens.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DAYS = "3650"


@dataclass(frozen=True)
class Pki:
    """Paths of every key and certificate the control plane uses."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def apiserver_cert(self) -> Path:
        return self.directory / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.directory / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.directory / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.directory / "admin.key"

    @property
    def kubelet_client_cert(self) -> Path:
        return self.directory / "apiserver-kubelet-client.crt"

    @property
    def kubelet_client_key(self) -> Path:
        return self.directory / "apiserver-kubelet-client.key"

    @property
    def node_serving_cert(self) -> Path:
        return self.directory / "node-serving.crt"

    @property
    def node_serving_key(self) -> Path:
        return self.directory / "node-serving.key"

    @property
    def admin_token(self) -> Path:
        """A bearer token for the admin (group system:masters), for curl and friends."""
        return self.directory / "admin.token"

    @property
    def token_auth_file(self) -> Path:
        """The apiserver's --token-auth-file (CSV: token,user,uid,"groups")."""
        return self.directory / "tokens.csv"

    @property
    def service_account_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def service_account_pub(self) -> Path:
        return self.directory / "sa.pub"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(path: Path) -> None:
    # P-256 rather than RSA: key generation is instant, and every component
    # (including service-account token signing, ES256) accepts it.
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


def _signed_cert(
    pki: Pki,
    cert: Path,
    key: Path,
    subject: str,
    *,
    usage: str,
    alt_names: list[str] | None = None,
) -> None:
    _new_key(key)
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
        _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(pki.ca_cert),
            "-CAkey",
            str(pki.ca_key),
            "-CAcreateserial",
            "-days",
            _DAYS,
            "-sha256",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        )


def ensure_pki(directory: Path) -> Pki:
    """Create the PKI under ``directory`` unless it is already there (idempotent)."""
    pki = Pki(directory)
    if pki.token_auth_file.exists():
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    _new_key(pki.ca_key)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        str(pki.ca_key),
        "-subj",
        "/CN=kubetune-local-ca",
        "-days",
        _DAYS,
        "-sha256",
        "-out",
        str(pki.ca_cert),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )
    _signed_cert(
        pki,
        pki.apiserver_cert,
        pki.apiserver_key,
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
    _signed_cert(
        pki,
        pki.admin_cert,
        pki.admin_key,
        "/O=system:masters/CN=kubetune-admin",
        usage="clientAuth",
    )
    _signed_cert(
        pki,
        pki.kubelet_client_cert,
        pki.kubelet_client_key,
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        usage="clientAuth",
    )
    _signed_cert(
        pki,
        pki.node_serving_cert,
        pki.node_serving_key,
        "/CN=kubetune-node",
        usage="serverAuth",
        alt_names=["IP:127.0.0.1", "DNS:localhost"],
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
