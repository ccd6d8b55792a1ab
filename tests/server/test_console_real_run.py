"""A job made in the console's form runs for real: the operator (as a process) and the real
trainer train the tiny model on the CPU from a dataset file sent with the form, and the job page,
open in Debian's headless chromium the whole time, follows it without a reload to the adapter's
sha256 and the evaluation answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from consolekit import (
    chromium,  # noqa: F401 -- the fixture `browser`
    count,
    mark_page,
    page_not_reloaded,
    screenshot,
    sign_in,
    text_of,
    wait_until,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from serverkit import CLAIM, ServerProcess, Tenant, ftj, make_tenant, poll_until, work_claim

from kubetune_devtools.pytest_plugin import Kubectl, apply

pytestmark = pytest.mark.integration

PROMPTS = ["Reverse: kube", "Reverse: tune"]


@pytest.fixture
def alice(kubectl: Kubectl, namespace: str) -> Tenant:
    tenant = make_tenant(kubectl, namespace, "alice")
    # As the `edit` role has it: the trainer's log, for the job page's log tail.
    apply(kubectl, namespace,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "alice-logs"},
         "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "alice-logs"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "alice-logs"},
         "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}]},
    )  # fmt: skip
    return tenant


def test_a_job_from_the_form_runs_and_its_page_follows_it_to_the_adapter(
    server: ServerProcess, browser: WebDriver, kubectl: Kubectl, alice: Tenant, tiny_assets: Path
) -> None:
    work_claim(kubectl, alice.namespace, model=tiny_assets / "model")
    sign_in(browser, server, alice.token, "/ui/new")
    for ident, value in {
        "f-metadata-name": "from-the-console",
        "f-spec-model-uri": f"pvc://{CLAIM}/model",
        "f-spec-output-uri": f"pvc://{CLAIM}/adapters/from-the-console",
        "f-spec-evaluation-prompts": "\n".join(PROMPTS),
    }.items():
        wait_until(browser, ident, lambda i=ident: browser.find_element(By.ID, i)).send_keys(value)
    dataset = tiny_assets / "data" / "reverse-prompt-completion.jsonl"
    browser.find_element(By.ID, "f-datasetFile").send_keys(str(dataset))
    browser.find_element(By.CSS_SELECTOR, 'button[value="create"]').click()
    wait_until(browser, "the job's page", lambda: text_of(browser, "h1") == "from-the-console")
    mark_page(browser)

    # Watch the page (never reloading it) until the job ends; the deadline moves with what the
    # page shows, so a busy machine waits longer and a stuck job still fails.
    seen_points: list[int] = []

    def observe() -> tuple[Any, ...]:
        phase = text_of(browser, "#phase")
        points = browser.execute_script(
            "const c = document.getElementById('loss-chart'); return c && c.dataset.points"
        )
        if phase == "Running" and points and int(points) not in seen_points:
            seen_points.append(int(points))
        return (phase, points, text_of(browser, "#step"))

    phase, *_ = poll_until(
        observe, lambda seen: seen[0] in ("Succeeded", "Failed"), 180,
        "the job page to show the job's end",
    )  # fmt: skip
    status = ftj(kubectl, alice.namespace, "from-the-console")["status"]
    assert phase == "Succeeded", json.dumps(status.get("conditions"), indent=1)
    assert page_not_reloaded(browser)
    assert seen_points, "the loss curve never showed while the job ran"
    history = status["progress"]["history"]
    assert text_of(browser, "#loss-chart").startswith("Training loss:")
    assert browser.execute_script(
        "return document.getElementById('loss-chart').dataset.points"
    ) == str(len([p for p in history if p.get("loss") is not None]))

    # The adapter and the answers, as the status has them.
    result = status["result"]
    assert text_of(browser, "#adapter-sha256") == result["adapter"]["sha256"]
    assert text_of(browser, "#adapter-uri") == result["adapter"]["uri"]
    samples = result["evaluation"]["samples"]
    assert [s["prompt"] for s in samples] == PROMPTS
    assert count(browser, "#answers tbody tr") == len(PROMPTS)
    answers = text_of(browser, "#answers")
    assert all(prompt in answers for prompt in PROMPTS)
    assert "Succeeded=True" in text_of(browser, "#timeline")
    assert "signature=" not in browser.page_source  # the dataset URL's, never on the page
    screenshot(browser, "console-job-real-run", 1500)
    # The log tail is read once, with the page: reload to see the finished trainer's.
    browser.refresh()
    log = wait_until(browser, "the trainer's log", lambda: text_of(browser, "#log").strip())
    assert not log.startswith("(you may not"), log
