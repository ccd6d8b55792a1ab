"""`kubetune local up --registry` on a running local cluster: a real OCI registry beside it, that
an independent client (oras) pushes to and pulls back from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_devtools.pytest_plugin import ClusterHandle

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def test_local_up_with_registry_starts_one_that_oras_pushes_to_and_pulls_back_from(
    local_cluster: ClusterHandle, registry_tools: Path, tmp_path: Path
) -> None:
    cluster = local_cluster.local()
    home = str(cluster.layout.home)
    up = subprocess.run([str(BIN / "kubetune"), "local", "--home", home, "up", "--registry"],
                        capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert up.returncode == 0, up.stderr
    [line] = [ln for ln in up.stdout.splitlines() if ln.startswith("an OCI registry runs")]
    host = line.split(" at ")[1].split()[0]
    assert host.startswith("127.0.0.1:")
    status = subprocess.run([str(BIN / "kubetune"), "local", "--home", home, "status"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert any(ln.split()[:2] == ["registry", "running"] for ln in status.stdout.splitlines())

    (tmp_path / "push").mkdir()
    (tmp_path / "push" / "note.txt").write_bytes(b"kubetune\n" * 100)
    oras = str(registry_tools / "oras")
    pushed = subprocess.run([oras, "push", "--plain-http", f"{host}/smoke/note:v1", "note.txt"],
                            cwd=tmp_path / "push", capture_output=True, text=True, timeout=60,
                            check=False)  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    pulled = subprocess.run([oras, "pull", "--plain-http", f"{host}/smoke/note:v1", "--output",
                             str(tmp_path / "pull")], capture_output=True, text=True, timeout=60,
                            check=False)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pull" / "note.txt").read_bytes() == b"kubetune\n" * 100
