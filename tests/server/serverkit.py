"""kubetune-server as a process for the server's tests: started with the settings the chart gives
it, on the loopback, against the local cluster; each test's users get real ServiceAccount tokens
and talk to it through the real openai SDK."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI

from kubetune.local.ports import free_port
from kubetune_devtools.pytest_plugin import Kubectl, apply, paced_poll, wait_for

# The claim, the tiny settings and the operator as a process are tests/operator's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from operatorkit import CLAIM, TINY_SETTINGS, host_port_service
from operatorkit import work_claim as bound_claim

BASE_MODEL = "tiny-llama"
#: What the platform puts under every job created through the API: the tiny model's settings on
#: the CPU, as tests/operator's tiny job has them.
JOB_TEMPLATE: dict[str, Any] = copy.deepcopy(TINY_SETTINGS)
#: A tenant's rights: FineTuneJobs and their Events in their own namespace, as the chart's
#: aggregated `edit` role gives them.
TENANT_RULES = [
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]},
]  # fmt: skip


class ServerProcess:
    """``kubetune-server`` in a subprocess, logging to a file."""

    def __init__(
        self, kubeconfig: Path, files_dir: Path, log_path: Path, cache_token: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Trainers on the session's real node download uploads through a Service whose endpoint
        # is this host's side of the node's link (they reach no address of the host otherwise).
        service = host_port_service(kubeconfig.parent, f"kubetune-server-{self.port}", self.port)
        #: The server's address in the dataset URLs it gives jobs (the Service's).
        self.dataset_base_url = f"http://{service}:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            # Every address: the tests' requests on loopback, the trainers' on the node's link.
            "KUBETUNE_SERVER_HOST": "0.0.0.0",
            "KUBETUNE_SERVER_PORT": str(self.port),
            "KUBETUNE_SERVER_KUBECONFIG": str(kubeconfig),
            "KUBETUNE_SERVER_FILES_DIR": str(files_dir),
            "KUBETUNE_SERVER_DATASET_BASE_URL": self.dataset_base_url,
            "KUBETUNE_SERVER_MODELS": json.dumps({BASE_MODEL: f"pvc://{CLAIM}/model"}),
            "KUBETUNE_SERVER_JOB_TEMPLATE": json.dumps(JOB_TEMPLATE),
            "KUBETUNE_SERVER_OUTPUT_URI": f"pvc://{CLAIM}/adapters/{{job}}",
            "KUBETUNE_SERVER_MAX_FILE_BYTES": str(4 * 1024 * 1024),
            "KUBETUNE_SERVER_RATE_LIMIT_PER_SECOND": "0",
            "PYTHONUNBUFFERED": "1",
        }
        if cache_token is not None:  # reads from the watch-backed cache, as the chart has it
            self.env["KUBETUNE_SERVER_CACHE_TOKEN_FILE"] = str(cache_token)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = Path(sys.executable).with_name("kubetune-server")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(binary)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(healthy, 60, "kubetune-server to answer /healthz")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, token: str, project: str | None) -> OpenAI:
        return OpenAI(
            api_key=token, base_url=f"{self.url}/v1", project=project, max_retries=0, timeout=60
        )


#: The server's own identity, as the chart gives it with server.cache.enabled: read FineTuneJobs.
SERVER_ACCOUNT = "kubetune-server"
SERVER_NAMESPACE = "kubetune-system"


def server_identity(kubectl: Kubectl, token_file: Path) -> Path:
    """The server's ServiceAccount, allowed get/list/watch on FineTuneJobs cluster-wide, and its
    token in ``token_file``."""
    kubectl("create", "namespace", SERVER_NAMESPACE, check=False)
    role = f"{SERVER_ACCOUNT}-read-jobs"
    apply(
        kubectl, SERVER_NAMESPACE,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVER_ACCOUNT}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": role},
         "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": role},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": SERVER_ACCOUNT,
                       "namespace": SERVER_NAMESPACE}]},
    )  # fmt: skip

    def token() -> str:  # the token controller needs a moment for a new ServiceAccount
        made = kubectl("create", "token", SERVER_ACCOUNT, "-n", SERVER_NAMESPACE,
                       "--duration", "4h", check=False)  # fmt: skip
        return made.stdout.strip()

    token_file.write_text(wait_for(token, 60, "the server's token"))
    token_file.chmod(0o600)
    return token_file


@dataclass(frozen=True)
class Tenant:
    """A ServiceAccount with a tenant's rights in ``namespace``, and its token."""

    namespace: str
    name: str
    token: str = field(repr=False)  # never in a test's output


def make_tenant(kubectl: Kubectl, namespace: str, name: str) -> Tenant:
    apply(
        kubectl, namespace,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": f"{name}-tenant"}, "rules": TENANT_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"{name}-tenant"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": f"{name}-tenant"},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    )  # fmt: skip
    token = kubectl("create", "token", name, "-n", namespace, "--duration", "2h").stdout.strip()
    return Tenant(namespace, name, token)


def work_claim(kubectl: Kubectl, namespace: str, model: Path | None = None) -> Path:
    """A bound PVC named ``work`` (with ``model`` copied in as ``model/``, the base the server
    offers); the directory behind it on this machine."""
    directory = bound_claim(kubectl, namespace)
    if model is not None:
        shutil.copytree(model, directory / "model")
    return directory


def poll_until(
    observe: Callable[[], tuple[Any, ...]],
    done: Callable[[tuple[Any, ...]], bool],
    patience: float,
    what: str,
) -> tuple[Any, ...]:
    """Observe until ``done``, the deadline moving with what is seen (``paced_poll``)."""

    def step() -> tuple[tuple[Any, ...] | None, tuple[Any, ...]]:
        seen = observe()
        return (seen if done(seen) else None), seen

    found: tuple[Any, ...] = paced_poll(step, patience, what)
    return found


def ftj(kubectl: Kubectl, namespace: str, name: str) -> Mapping[str, Any]:
    found: Mapping[str, Any] = json.loads(
        kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout
    )
    return found
