"""The tests' OCI registry (distribution's, with a login) and the ``oras`` CLI that reads it back:
an independent client, so a push through kubetune is checked by what another tool pulls."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.local.registry import LoopbackRegistry

USERNAME = "kubetune-test"


def bcrypt_htpasswd(path: Path, username: str, password: str) -> Path:
    """An htpasswd file with one bcrypt entry (the only hash distribution's registry reads),
    through the C library's crypt(3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))  # noqa: S324 -- bcrypt
    path.write_text(f"{username}:{hashed}\n")
    return path


def docker_config(path: Path, host: str, username: str, password: str) -> Path:
    """A docker config (the content of a kubernetes.io/dockerconfigjson Secret) for ``host``."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


@dataclass
class LoginRegistry:
    """A registry of this host that asks for a login; ``auth_file`` holds it. ``host`` is the
    name ``oci://`` URIs give it: its own address, or the Service in front of it."""

    process: LoopbackRegistry
    tools: Path
    username: str
    password: str
    auth_file: Path
    host: str

    def oras(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``oras ARGS --plain-http --registry-config AUTH_FILE``, reaching ``host`` at the
        registry's own address (this host reaches no Service address)."""
        name, _, port = self.host.rpartition(":")
        resolve = f"{name}:{port}:{self.process.address}:{self.process.port}"
        result = subprocess.run(
            [str(self.tools / "oras"), *args, "--plain-http", "--registry-config",
             str(self.auth_file), "--resolve", resolve],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if check:
            assert result.returncode == 0, f"oras {' '.join(args)}:\n{result.stderr}"
        return result

    def manifest(self, reference: str) -> dict[str, Any]:
        return dict(json.loads(self.oras("manifest", "fetch", reference).stdout))


def start_test_registry(
    root: Path,
    tools: Path,
    address: str = "127.0.0.1",
    published: Callable[[int], str] | None = None,
) -> LoginRegistry:
    """A registry on ``address`` (loopback unless given) that asks for a login; named by its
    address, or by what ``published(port)`` returns (``host:port`` of a Service in front of it,
    for pods of a real node)."""
    password = secrets.token_urlsafe(18)
    root.mkdir(parents=True, exist_ok=True)
    htpasswd = bcrypt_htpasswd(root / "htpasswd", USERNAME, password)
    process = LoopbackRegistry(
        root / "registry", htpasswd, binary=tools / "registry", address=address
    )
    host = published(process.port) if published else process.host
    auth_file = docker_config(root / "auth.json", host, USERNAME, password)
    return LoginRegistry(process, tools, USERNAME, password, auth_file, host)


@contextlib.contextmanager
def running_test_registry(
    root: Path,
    tools: Path,
    address: str = "127.0.0.1",
    published: Callable[[int], str] | None = None,
) -> Iterator[LoginRegistry]:
    """A registry of its own that asks for a login (``start_test_registry``), stopped on
    leaving."""
    registry = start_test_registry(root, tools, address, published)
    try:
        yield registry
    finally:
        registry.process.close()
