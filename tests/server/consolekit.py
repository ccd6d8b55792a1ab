"""The console's browser tests' kit: Debian's headless chromium through its chromedriver
(Selenium; nothing downloaded), and what a person does with it: sign in, wait for what the page
shows (with a deadline), read it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from serverkit import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: How long a page may take to show what the test waits for (a deadline, not a pace: each wait
#: ends as soon as the page shows it).
DEADLINE = 60


@pytest.fixture(scope="module", name="browser")
def chromium() -> Iterator[WebDriver]:
    """The module's browser: Debian's headless chromium (import ``chromium`` to use it)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `bash hack/browser/install.sh` (make test)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root in a container; the page is the test's own server
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1366,900",  # a laptop screen
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Nothing but the loopback resolves: a page that fetched anything from outside would
        # show it broken (and the resource check below would name it).
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# --- what the test does as a person ------------------------------------------------------------


def wait_until(browser: WebDriver, what: str, seen: Callable[[], Any]) -> Any:
    """Wait for the page to show ``seen`` (truthy), up to the deadline."""

    def look(_: WebDriver) -> Any:
        try:
            return seen()
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    try:
        return WebDriverWait(browser, DEADLINE, poll_frequency=0.25).until(look)
    except TimeoutException:
        shown = text_of(browser)[:3000]
        raise AssertionError(f"the page never showed {what}; it shows:\n{shown}") from None


def text_of(browser: WebDriver, css: str = "body") -> str:
    """What the page shows at ``css`` now ("" where nothing matches), read in one step in the
    page: a live fragment swapped in meanwhile can't make it stale."""
    found = browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css
    )
    return str(found or "").replace("\t", " ")  # table cells: one space between, as seen


def count(browser: WebDriver, css: str) -> int:
    return int(browser.execute_script("return document.querySelectorAll(arguments[0]).length", css))


def type_token(browser: WebDriver, console: ServerProcess, token: str, path: str) -> None:
    """Open ``path`` signed out, land on the login page, type the token and press Enter."""
    browser.get(f"{console.url}/ui/login")
    browser.delete_all_cookies()
    browser.get(f"{console.url}{path}")
    field = wait_until(browser, "the login form", lambda: browser.find_element(By.ID, "token"))
    field.send_keys(token, Keys.ENTER)


def sign_in(browser: WebDriver, console: ServerProcess, token: str, path: str = "/ui/") -> None:
    type_token(browser, console, token, path)
    wait_until(browser, "a signed-in page", lambda: browser.find_elements(By.CSS_SELECTOR, "nav"))


def row_of(browser: WebDriver, namespace: str, name: str) -> Any:
    return browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{namespace}/{name}"]')


def screenshot(browser: WebDriver, name: str, height: int = 900) -> None:
    """With ``KUBETUNE_CONSOLE_SCREENSHOTS=DIR``, keep what the page looks like now as
    ``DIR/name.png`` (docs/console.md's pictures come from here)."""
    folder = os.environ.get("KUBETUNE_CONSOLE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1366, height)
    browser.save_screenshot(str(Path(folder) / f"{name}.png"))
    browser.set_window_size(1366, 900)


def mark_page(browser: WebDriver) -> None:
    """Leave a mark in the page's window: it is gone if the page reloads."""
    browser.execute_script("window.kubetuneTestMark = 'still here';")


def page_not_reloaded(browser: WebDriver) -> bool:
    return bool(browser.execute_script("return window.kubetuneTestMark") == "still here")
