"""What /metrics shows a caller, against the real apiserver: the operator asks it whose a bearer
token is (TokenReview) and whether that identity may get /metrics (SubjectAccessReview), as the
chart runs it (``metrics.auth: true``). The metrics name every watched namespace's jobs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from operatorkit import CRD, OperatorProcess, log_tail_after, started
from test_operator_integration import apply, finetunejob

from kubetune_devtools.pytest_plugin import Kubectl, install_crd, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def operator(
    kubectl: Kubectl, kubeconfig_path: Path, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    install_crd(kubectl, CRD)
    env = {"KUBETUNE_METRICS_AUTH": "true", "KUBETUNE_LEADER_ELECTION": "false"}
    process = OperatorProcess(kubeconfig_path, tmp_path / "log", ["--namespace", namespace], env)
    yield from started(process)


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


def scrape(url: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""  # not serving yet


def token_of(kubectl: Kubectl, namespace: str, account: str) -> str:
    kubectl("create", "serviceaccount", account, "-n", namespace)
    return kubectl("create", "token", account, "-n", namespace).stdout.strip()


def test_metrics_show_nothing_to_a_caller_without_a_token_or_without_the_right(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    # A job with progress: its series name its namespace and name.
    apply(kubectl, namespace, finetunejob("secret-project", {
        "model": {"uri": "org/model"}, "dataset": {"uri": "pvc://nowhere/data.jsonl"},
        "output": {"uri": "pvc://nowhere/out"}, "resources": {"gpus": 0},
    }))  # fmt: skip
    kubectl("patch", "ftj", "secret-project", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": {"progress": {"step": 7}}}))  # fmt: skip
    reader_role = f"{namespace}-metrics-reader"
    kubectl("create", "clusterrole", reader_role, "--verb=get", "--non-resource-url=/metrics")
    try:
        kubectl("create", "clusterrolebinding", reader_role, f"--clusterrole={reader_role}",
                f"--serviceaccount={namespace}:scraper")  # fmt: skip
        scraper = token_of(kubectl, namespace, "scraper")
        nobody = token_of(kubectl, namespace, "nobody")
        series = (
            f'kubetune_finetunejob_progress_step{{name="secret-project",namespace="{namespace}"}}'
        )

        # A reader with the right sees every watched namespace's jobs.
        def readable() -> tuple[int, str] | None:
            got = scrape(operator.metrics_url, scraper)
            return got if got[0] == 200 and series in got[1] else None

        code, body = wait_for(readable, 60, "the scraper to read the job's progress series")
        assert code == 200

        for token, expected in ((None, 401), ("not-a-token", 401), (nobody, 403)):
            code, body = scrape(operator.metrics_url, token)
            assert code == expected, (token is None, code, body)
            assert (
                "kubetune_" not in body and namespace not in body and "secret-project" not in body
            )
    finally:
        kubectl("delete", "clusterrolebinding", reader_role, check=False)
        kubectl("delete", "clusterrole", reader_role, check=False)
