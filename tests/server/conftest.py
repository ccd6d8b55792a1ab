"""The server suite's set-up: the CRD, the operator as a process (tests/operator's operatorkit),
and kubetune-server as a process on the loopback, for the module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverkit import ServerProcess, server_identity

from kubetune_devtools.pytest_plugin import Kubectl, install_crd

# The operator as a process is tests/operator's (one OperatorProcess for every suite).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from operatorkit import CRD, OperatorProcess, log_tail_after, started


@pytest.fixture(autouse=True)
def _trainer_image_on_the_node(request: pytest.FixtureRequest) -> None:
    """Integration tests' trainers run on the session's real node from the tests' trainer image
    (``trainer_test_image``), imported there once per session."""
    if request.node.get_closest_marker("integration") is not None:
        request.getfixturevalue("trainer_test_image")


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(kubectl, CRD)
    yield from started(
        OperatorProcess(kubeconfig_path, tmp_path_factory.mktemp("operator") / "log")
    )


@pytest.fixture(scope="module")
def server(
    operator: OperatorProcess,
    kubectl: Kubectl,
    kubeconfig_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("server")
    token = server_identity(kubectl, root / "identity-token")
    process = ServerProcess(kubeconfig_path, root / "files", root / "log", cache_token=token)
    process.start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """After an integration test, the server's and the operator's log tails (shown on failure)."""
    if "server" not in request.fixturenames:
        yield
        return
    server: ServerProcess = request.getfixturevalue("server")
    operator: OperatorProcess = request.getfixturevalue("operator")
    yield from log_tail_after(operator)
    print(f"--- server log (tail) ---\n{server.log_tail()}")
