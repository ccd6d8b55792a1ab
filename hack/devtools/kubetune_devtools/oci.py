"""The tests' OCI registry (distribution's, with a login) and the ``oras`` CLI that reads it back:
an independent client, so a push through kubetune is checked by what another tool pulls."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
import warnings
from collections.abc import Iterator
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
    """A registry on loopback that asks for a login; ``auth_file`` holds it."""

    process: LoopbackRegistry
    tools: Path
    username: str
    password: str
    auth_file: Path

    @property
    def host(self) -> str:
        return self.process.host

    def oras(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``oras ARGS --plain-http --registry-config AUTH_FILE``."""
        result = subprocess.run(
            [str(self.tools / "oras"), *args, "--plain-http", "--registry-config",
             str(self.auth_file)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if check:
            assert result.returncode == 0, f"oras {' '.join(args)}:\n{result.stderr}"
        return result

    def manifest(self, reference: str) -> dict[str, Any]:
        return dict(json.loads(self.oras("manifest", "fetch", reference).stdout))


def start_test_registry(root: Path, tools: Path) -> LoginRegistry:
    password = secrets.token_urlsafe(18)
    root.mkdir(parents=True, exist_ok=True)
    htpasswd = bcrypt_htpasswd(root / "htpasswd", USERNAME, password)
    process = LoopbackRegistry(root / "registry", htpasswd, binary=tools / "registry")
    auth_file = docker_config(root / "auth.json", process.host, USERNAME, password)
    return LoginRegistry(process, tools, USERNAME, password, auth_file)


@contextlib.contextmanager
def running_test_registry(root: Path, tools: Path) -> Iterator[LoginRegistry]:
    """A registry of its own on loopback that asks for a login, stopped on leaving."""
    registry = start_test_registry(root, tools)
    try:
        yield registry
    finally:
        registry.process.close()
