"""The web console in a real headless Chromium (Debian's, driven through its chromedriver by
Selenium), against kubetune-server on the real local control plane, signed in with real
ServiceAccount tokens: what a person sees.

No operator runs in this module: the test writes each job's status with the admin's credentials
(as the operator would, through the status subresource), so the console's view of every phase,
curve and answer is pinned exactly. The operator's own tests pin what it writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consolekit import (
    chromium,  # noqa: F401 -- the fixture `browser`
    count,
    mark_page,
    page_not_reloaded,
    row_of,
    screenshot,
    sign_in,
    text_of,
    type_token,
    wait_until,
)
from operatorkit import CRD
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from serverkit import ServerProcess, Tenant, make_tenant

from kubetune_devtools.pytest_plugin import (
    Kubectl,
    apply,
    create_namespace,
    install_crd,
    minimal_finetunejob,
)

pytestmark = pytest.mark.integration

MARKUP = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def console(
    kubectl: Kubectl, kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    install_crd(kubectl, CRD)
    root = tmp_path_factory.mktemp("console")
    process = ServerProcess(kubeconfig_path, root / "files", root / "log")
    process.start()
    yield process
    process.stop()
    print(f"--- server log (tail) ---\n{process.log_tail()}")


@pytest.fixture
def alice(kubectl: Kubectl, namespace: str) -> Tenant:
    return make_tenant(kubectl, namespace, "alice")


@pytest.fixture
def mallory(kubectl: Kubectl, namespace: str) -> Iterator[Tenant]:
    """A second user: a tenant of a namespace of their own, with no rights in alice's."""
    own = create_namespace(kubectl, f"{namespace[:50]}-other")
    yield make_tenant(kubectl, own, "mallory")
    kubectl("delete", "namespace", own, "--wait=false", check=False)


# --- what the operator would write -------------------------------------------------------------


def set_status(kubectl: Kubectl, namespace: str, name: str, status: dict[str, Any]) -> None:
    kubectl(
        "patch", "ftj", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def condition(type_: str, reason: str, message: str, at: str) -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": at}  # fmt: skip


ESTIMATE = {"examples": 64, "tokens": 4096, "sequences": 64, "steps": 10, "gpuKind": "H100-80GB",
            "peakGiB": 9.5, "seconds": 300.0}  # fmt: skip


def running(steps: int) -> dict[str, Any]:
    history = [
        {"step": i, "loss": round(2.0 - 0.15 * i, 3), "learningRate": 0.01 * (1 - i / 20)}
        for i in range(1, steps + 1)
    ]
    return {
        "phase": "Running",
        "startTime": "2026-01-01T10:00:00Z",
        "estimate": ESTIMATE,
        "conditions": [condition("Running", "TrainerRunning", "training", "2026-01-01T10:00:00Z")],
        "progress": {
            "step": steps, "totalSteps": 10, "percent": steps * 10.0,
            "loss": history[-1]["loss"], "learningRate": history[-1]["learningRate"],
            "etaSeconds": 30.0 * (10 - steps), "history": history,
        },
    }  # fmt: skip


def succeeded(answers: list[dict[str, str]], sha: str) -> dict[str, Any]:
    status = running(10)
    status.update(
        phase="Succeeded",
        completionTime="2026-01-01T10:04:10Z",
        conditions=[
            condition(
                "Succeeded", "TrainerSucceeded", "the adapter is saved", "2026-01-01T10:04:10Z"
            ),
        ],
        result={
            "outcome": "Succeeded",
            "reason": "Succeeded",
            "adapter": {
                "uri": "pvc://work/adapters/support-bot",
                "sha256": sha,
                "sizeBytes": 123456,
            },
            "evaluation": {"samples": answers, "metrics": {"eval_loss": 0.42}},
            "plan": {
                "gradientCheckpointing": "off",
                "microBatchSize": 4,
                "tokensPerMicroStep": 256,
                "gradientAccumulationSteps": 4,
                "optimizer": "paged_adamw_8bit",
                "peakGib": 8.75,
            },
        },
    )
    return status


# --- the scenarios ---------------------------------------------------------------------------


def test_a_running_jobs_phase_and_loss_curve_advance_without_a_reload(
    console: ServerProcess, browser: WebDriver, kubectl: Kubectl, alice: Tenant
) -> None:
    ns = alice.namespace
    apply(kubectl, ns, minimal_finetunejob("support-bot"))
    sign_in(browser, console, alice.token)

    # The list: the job is there, Pending; then it runs, and the row follows without a reload.
    row = f'tr[data-job="{ns}/support-bot"]'
    wait_until(browser, "the job's row, Pending", lambda: "Pending" in text_of(browser, row))
    mark_page(browser)
    set_status(kubectl, ns, "support-bot", running(3))
    wait_until(browser, "the row Running", lambda: "Running" in text_of(browser, row))
    assert count(browser, f"{row} td.loss svg polyline") == 1, "no loss sparkline"
    shown = text_of(browser, row)
    assert "H100-80GB" in shown and "9.5 GiB" in shown and "5m 00s" in shown  # the estimate
    assert "3m 30s" in shown  # ETA
    assert page_not_reloaded(browser)
    screenshot(browser, "console-jobs", 560)

    # The job page, reached from the keyboard: its curves grow as the trainer reports.
    link = browser.find_element(By.CSS_SELECTOR, f'{row} a[href="/ui/jobs/{ns}/support-bot"]')
    browser.execute_script("arguments[0].focus()", link)
    link.send_keys(Keys.ENTER)
    wait_until(
        browser, "the loss chart with 3 points",
        lambda: "Training loss: 1.55 at step 3" in text_of(browser, '#loss-chart[data-points="3"]'),
    )  # fmt: skip
    assert count(browser, "#loss-chart svg polyline") == 1
    assert count(browser, "#lr-chart svg polyline") == 1
    assert "Running" in text_of(browser, "#phase")
    mark_page(browser)
    set_status(kubectl, ns, "support-bot", running(6))
    wait_until(
        browser, "the loss chart with 6 points",
        lambda: "Training loss: 1.1 at step 6" in text_of(browser, '#loss-chart[data-points="6"]'),
    )  # fmt: skip
    assert text_of(browser, "#step") == "6"
    screenshot(browser, "console-job-running", 640)
    assert page_not_reloaded(browser)

    # It succeeds: the answers, the adapter's digest and the estimate against the actual appear.
    sha = "ab" * 32
    answers = [{"prompt": "Reverse: abc", "base": "abc abc", "adapter": "cba"}]
    set_status(kubectl, ns, "support-bot", succeeded(answers, sha))
    wait_until(browser, "Succeeded", lambda: "Succeeded" in text_of(browser, "#phase"))
    assert text_of(browser, "#adapter-sha256") == sha
    assert text_of(browser, "#adapter-uri") == "pvc://work/adapters/support-bot"
    assert "cba" in text_of(browser, "#answers") and "abc abc" in text_of(browser, "#answers")
    estimate = text_of(browser, "#estimate")
    assert "Training time 5m 00s 4m 10s" in estimate
    assert "Peak GPU memory 9.50 GiB 8.75 GiB" in estimate
    assert "Succeeded=True" in text_of(browser, "#timeline")
    assert page_not_reloaded(browser)
    assert count(browser, "#yaml") == 1
    screenshot(browser, "console-job-succeeded", 1500)


def test_a_tenant_sees_only_the_namespaces_they_may_list(
    console: ServerProcess, browser: WebDriver, kubectl: Kubectl, alice: Tenant, mallory: Tenant
) -> None:
    apply(kubectl, alice.namespace, minimal_finetunejob("alice-secret-run"))
    apply(kubectl, mallory.namespace, minimal_finetunejob("mallory-run"))
    sign_in(browser, console, mallory.token)

    wait_until(browser, "mallory's job", lambda: row_of(browser, mallory.namespace, "mallory-run"))
    assert text_of(browser, "#namespaces") == f"Namespaces: {mallory.namespace}"
    assert "alice-secret-run" not in text_of(browser)

    # Asking for alice's namespace by name shows a refusal, not her jobs.
    browser.get(f"{console.url}/ui/?namespace={alice.namespace}")
    wait_until(browser, "the refusal", lambda: "You may not list" in text_of(browser, "main"))
    assert "alice-secret-run" not in text_of(browser)
    browser.get(f"{console.url}/ui/jobs/{alice.namespace}/alice-secret-run")
    wait_until(browser, "the error page", lambda: "forbidden" in text_of(browser, "main"))
    # The same words as for a job that isn't there: nothing of alice's job shows.
    assert text_of(browser, "main .error").startswith("forbidden: the caller may not get")
    assert not browser.find_elements(By.ID, "live")


def test_markup_in_tenant_strings_renders_as_text(
    console: ServerProcess, browser: WebDriver, kubectl: Kubectl, alice: Tenant
) -> None:
    ns = alice.namespace
    job = minimal_finetunejob("markup")
    job["spec"]["dataset"]["columns"] = {"prompt": MARKUP}
    apply(kubectl, ns, job)
    status = succeeded([{"prompt": MARKUP, "base": MARKUP, "adapter": MARKUP}], "cd" * 32)
    status["conditions"][0]["message"] = MARKUP
    set_status(kubectl, ns, "markup", status)
    apply(kubectl, ns, {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "markup.event"},
        "involvedObject": {"kind": "FineTuneJob", "name": "markup", "namespace": ns,
                           "apiVersion": "kubetune.io/v1alpha1"},
        "reason": "Validated", "message": MARKUP, "type": "Normal",
        "firstTimestamp": "2026-01-01T10:00:01Z", "lastTimestamp": "2026-01-01T10:00:01Z",
        "source": {"component": "kubetune-operator"},
    })  # fmt: skip
    sign_in(browser, console, alice.token, f"/ui/jobs/{ns}/markup")

    wait_until(browser, "the answers", lambda: MARKUP in text_of(browser, "#answers"))
    assert text_of(browser, "#answers").count(MARKUP) == 3  # prompt, base and adapter, as text
    assert text_of(browser, "#timeline").count(MARKUP) == 2  # the condition and the Event
    assert MARKUP in text_of(browser, "code.column")  # the dataset column
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script")
    assert "pwned" not in browser.title

    # The form sends back what was typed as text, too.
    browser.get(f"{console.url}/ui/new")
    name = wait_until(browser, "the form", lambda: browser.find_element(By.ID, "f-metadata-name"))
    name.send_keys(MARKUP, Keys.ENTER)
    wait_until(browser, "the problems", lambda: browser.find_element(By.ID, "problems"))
    assert browser.find_element(By.ID, "f-metadata-name").get_attribute("value") == MARKUP
    assert "metadata.name: must be a DNS label" in text_of(browser, "#problems")
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script")
    assert "pwned" not in browser.title


def test_the_form_refuses_an_invalid_spec_naming_the_field_then_creates_the_job(
    console: ServerProcess, browser: WebDriver, kubectl: Kubectl, alice: Tenant
) -> None:
    ns = alice.namespace
    sign_in(browser, console, alice.token, "/ui/new")
    fields = {
        "f-metadata-name": "from-the-form",
        "f-spec-model-uri": "pvc://work/model",
        "f-spec-dataset-uri": "pvc://work/data/train.jsonl",
        "f-spec-training-learningRate": "-0.5",
        "f-spec-output-uri": "pvc://work/adapters/from-the-form",
    }
    for ident, value in fields.items():
        wait_until(browser, ident, lambda i=ident: browser.find_element(By.ID, i)).send_keys(value)

    # What an empty field becomes is shown: the platform template's value, else the default.
    def placeholder(ident: str) -> str | None:
        return browser.find_element(By.ID, ident).get_attribute("placeholder")

    assert placeholder("f-spec-training-batchSize") == "4"  # serverkit.JOB_TEMPLATE's
    assert placeholder("f-spec-model-revision") == "main"  # the API models' default
    browser.find_element(By.CSS_SELECTOR, 'button[value="create"]').click()

    problems = wait_until(browser, "the problems", lambda: browser.find_element(By.ID, "problems"))
    assert "spec.training.learningRate" in problems.text
    field = browser.find_element(By.ID, "f-spec-training-learningRate")
    assert field.get_attribute("aria-invalid") == "true"
    assert "greater than 0" in text_of(browser, "#f-spec-training-learningRate-error")
    assert browser.switch_to.active_element == problems  # said first, focus moved there
    gone = kubectl("get", "ftj", "from-the-form", "-n", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr

    field.clear()
    field.send_keys("0.0001")
    browser.find_element(By.CSS_SELECTOR, 'button[value="preview"]').click()
    preview = wait_until(browser, "the YAML", lambda: browser.find_element(By.ID, "preview"))
    assert "learningRate: 0.0001" in preview.text and "name: from-the-form" in preview.text
    browser.find_element(By.CSS_SELECTOR, 'button[value="create"]').click()

    wait_until(browser, "the job's page", lambda: browser.find_elements(By.ID, "live"))
    assert text_of(browser, "h1") == "from-the-form"
    created = json.loads(kubectl("get", "ftj", "from-the-form", "-n", ns, "-o", "json").stdout)
    assert created["spec"]["training"]["learningRate"] == 0.0001
    assert created["spec"]["output"]["uri"] == "pvc://work/adapters/from-the-form"


def test_sign_in_keeps_the_token_in_a_strict_http_only_cookie_under_a_strict_policy(
    console: ServerProcess, browser: WebDriver, alice: Tenant
) -> None:
    type_token(browser, console, "not-a-token", "/ui/")
    wait_until(browser, "the refusal", lambda: "does not accept" in text_of(browser, "main"))
    assert not browser.get_cookies()

    sign_in(browser, console, alice.token)
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # no script can read it
    origin = console.url
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert resources and all(url.startswith(origin) for url in resources), resources

    request = urllib.request.Request(
        f"{origin}/ui/", headers={"Cookie": f"{cookie['name']}={cookie['value']}"}
    )
    with urllib.request.urlopen(request) as answer:
        policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "default-src 'none'" in policy

    # Logging out (from the keyboard) forgets the session.
    button = browser.find_element(By.CSS_SELECTOR, ".logout button")
    browser.execute_script("arguments[0].focus()", button)
    button.send_keys(Keys.ENTER)
    wait_until(browser, "the login page", lambda: browser.find_elements(By.ID, "token"))
    assert not browser.get_cookies()


def test_kubetune_ui_opens_the_console_as_the_kubeconfig_user(
    console: ServerProcess, browser: WebDriver, kubectl: Kubectl, kubeconfig_path: Path,
    namespace: str,
) -> None:  # fmt: skip
    apply(kubectl, namespace, minimal_finetunejob("admins-view"))
    cli = shutil.which("kubetune", path=str(Path(sys.executable).parent))
    assert cli
    process = subprocess.Popen(
        [cli, "ui", "--no-browser", "--kubeconfig", str(kubeconfig_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "http://127.0.0.1:" in first, first
        url = first.split(": ", 1)[1].strip()
        browser.get(f"{console.url}/ui/login")
        browser.delete_all_cookies()
        browser.get(url)
        # The admin (the kubeconfig's client certificate) may list every namespace.
        wait_until(browser, "the admin's job", lambda: row_of(browser, namespace, "admins-view"))
        assert namespace in text_of(browser, "#namespaces")
        browser.get(url)  # the launch link works once
        wait_until(browser, "the refusal", lambda: "used already" in text_of(browser, "main"))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_dataset_file_sent_with_the_form_is_kept_and_the_job_reads_it_from_the_server(
    console: ServerProcess, browser: WebDriver, kubectl: Kubectl, alice: Tenant, tmp_path: Path
) -> None:
    ns = alice.namespace
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    good = tmp_path / "reverse.jsonl"
    good.write_text("".join(
        json.dumps({"prompt": f"Reverse: {w}", "completion": w[::-1]}) + "\n"
        for w in ("abc", "kube", "tune")
    ))  # fmt: skip
    sign_in(browser, console, alice.token, "/ui/new")
    for ident, value in {
        "f-metadata-name": "uploaded",
        "f-spec-model-uri": "pvc://work/model",
        "f-spec-output-uri": "pvc://work/adapters/uploaded",
    }.items():
        wait_until(browser, ident, lambda i=ident: browser.find_element(By.ID, i)).send_keys(value)
    browser.find_element(By.ID, "f-datasetFile").send_keys(str(bad))
    browser.find_element(By.CSS_SELECTOR, 'button[value="create"]').click()
    wait_until(browser, "the refusal", lambda: "line 2" in text_of(browser, "#problems"))
    assert "datasetFile: invalid training file" in text_of(browser, "#problems")

    browser.find_element(By.ID, "f-datasetFile").send_keys(str(good))
    browser.find_element(By.CSS_SELECTOR, 'button[value="create"]').click()
    wait_until(browser, "the job's page", lambda: text_of(browser, "h1") == "uploaded")
    spec = json.loads(kubectl("get", "ftj", "uploaded", "-n", ns, "-o", "json").stdout)["spec"]
    uri = spec["dataset"]["uri"]
    assert uri.startswith(f"{console.dataset_base_url}/datasets/{ns}/file-"), uri
    # The job's page shows where the data is, not the URL's signature (the YAML included).
    assert uri.partition("?")[0] in text_of(browser, "main")
    assert "signature=" not in browser.page_source
    # What the trainer pod downloads (through the Service; this host asks on loopback).
    with urllib.request.urlopen(uri.replace(console.dataset_base_url, console.url)) as answer:
        assert answer.read() == good.read_bytes()


def test_behind_an_auth_proxy_the_console_takes_the_callers_token_from_its_header(
    kubectl: Kubectl, kubeconfig_path: Path, tmp_path: Path, alice: Tenant, console: ServerProcess
) -> None:
    apply(kubectl, alice.namespace, minimal_finetunejob("through-the-proxy"))
    proxied = ServerProcess(kubeconfig_path, tmp_path / "files", tmp_path / "log")
    proxied.env["KUBETUNE_SERVER_CONSOLE_TOKEN_HEADER"] = "X-Forwarded-Access-Token"
    proxied.start()
    try:

        def get(path: str, headers: dict[str, str]) -> tuple[str, str]:
            request = urllib.request.Request(f"{proxied.url}{path}", headers=headers)
            with urllib.request.urlopen(request) as answer:
                return answer.url, answer.read().decode()

        url, page = get("/ui/", {"X-Forwarded-Access-Token": alice.token})
        assert url == f"{proxied.url}/ui/" and 'data-job="' in page
        assert f'data-job="{alice.namespace}/through-the-proxy"' in page
        # Without the header (a request that didn't pass the proxy): the login page.
        url, page = get("/ui/", {})
        assert url.startswith(f"{proxied.url}/ui/login") and 'id="token"' in page
    finally:
        proxied.stop()
