"""A real MLflow tracking server for the tests (``mlflow server``, from kubetune's dev extra).

Started on a free port (of loopback, or of the address given) with a sqlite backend and a local
artifact root under ``root``, with MLflow's basic-auth app on: a run lands only when the trainer
presents the admin's credentials, so a test that sees the run also sees that the credentials
reached the trainer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ADMIN = "admin"


@dataclass(frozen=True)
class MlflowServer:
    url: str
    username: str
    password: str
    log: Path

    def client(self) -> object:
        """An ``mlflow.tracking.MlflowClient`` of this server, with its credentials."""
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"] = self.username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = self.password
        return MlflowClient(tracking_uri=self.url)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 -- http only
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and asking for the credentials
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(
    root: Path,
    *,
    host: str = "127.0.0.1",
    names: Sequence[str] = (),
    startup_seconds: float = 600,
) -> Iterator[MlflowServer]:
    """``mlflow server`` with basic auth, until the block ends; its process group is stopped.

    It is waited for while it lives: about 15 s on an idle machine, but its imports (the CLI's,
    then uvicorn's worker's) took over 5 minutes on a 2-core machine under a load of 25; the cap
    only stops a server that hangs. Requests naming ``host`` or one of ``names`` (with any port)
    get through MLflow's Host header check; with no ``names``, its defaults (loopback and private
    addresses)."""
    root.mkdir(parents=True, exist_ok=True)
    password = "pw-" + secrets.token_hex(16)
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    port = _free_port(host)
    url = f"http://{host}:{port}"
    log = root / "server.log"
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        # Its background job runner starts a pool of workers the tests never use.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    mlflow = Path(sys.executable).with_name("mlflow")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(mlflow), "server", "--app-name", "basic-auth",
                "--host", host, "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--default-artifact-root", (root / "artifacts").as_uri(),
                *(["--allowed-hosts", ",".join(f"{n},{n}:*" for n in (host, *names))]
                  if names else []),
            ],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {process.returncode}:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            if _answers(f"{url}/health"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy within {startup_seconds:g}s:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        yield MlflowServer(url=url, username=ADMIN, password=password, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
