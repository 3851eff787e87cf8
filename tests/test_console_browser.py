"""The console in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

A real ``hashfed serve`` with data: login is required and a forged or expired token is refused;
every page loads without a console error and shows what the API shows; the entry page checks its
inclusion proof in the browser; the lookup form finds a near-duplicate. A screenshot of each page
is written to the test's directory and must not be blank.
"""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from federation.console.access import ConsoleAccess
from federation.hub import open_node
from tests.conftest import Federation
from tests.faults import free_port, start_hashfed, wait_exit
from tests.helpers import batch_doc, envelope, flip, item, opinion_doc, pdq

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver: Any = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True
    )
from selenium.webdriver.common.by import By  # noqa: E402 - after the skip above
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PAGES = ("", "members", "log", "log/main/2", "peers", "refusals", "lookup")


@pytest.fixture
def served(federation: Federation, tmp_path: Path) -> Iterator[str]:
    node = open_node(federation.data)
    acme, beta = federation.members["acme"], federation.members["beta"]
    for seed in range(6):
        node.submit("main", envelope(acme, batch_doc("acme", [item("pdq", pdq(seed), ["demo"])])))
    node.submit("main", envelope(beta, opinion_doc("beta", [("pdq", pdq(1), "positive")])))
    node.store.close()
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_hashfed("serve", str(federation.data.path), "--port", str(port), log=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            with urllib.request.urlopen(url + "/v1/ready", timeout=1) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        wait_exit(proc, 60)


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def log_in(browser: Any, url: str, token: str) -> None:
    browser.get(url + "/console/")
    assert browser.current_url.endswith("/console/login")
    field = browser.find_element(By.NAME, "token")
    field.send_keys(token)
    field.submit()
    # The answer is a new page: wait for it, or the next look finds the form that was just sent.
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(field))


def console_errors(browser: Any) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_console_in_a_real_browser(
    served: str, browser: Any, federation: Federation, tmp_path: Path
) -> None:
    access = ConsoleAccess(federation.data.console_tokens_file)
    log_in(browser, served, "forged-token")
    assert "not one this hub issued" in browser.find_element(By.CLASS_NAME, "error").text
    expired, _ = access.issue(1, now=time.time() - 7200)
    log_in(browser, served, expired)
    assert "has expired" in browser.find_element(By.CLASS_NAME, "error").text
    assert browser.current_url.endswith("/console/login")

    browser.get_log("browser")  # the refused logins answered 401: that is what they should do

    token, _ = access.issue(1)
    log_in(browser, served, token)
    assert browser.current_url.endswith("/console/")
    blank = _blank_screenshot(browser)
    for page in PAGES:
        browser.get(f"{served}/console/{page}")
        WebDriverWait(browser, 10).until(
            lambda b: b.execute_script("return document.readyState") == "complete"
        )
        if page.startswith("log/"):
            WebDriverWait(browser, 10).until(
                lambda b: b.find_element(By.ID, "proof-browser").text != "checking…"
            )
            assert browser.find_element(By.ID, "proof-browser").text == "the proof verifies"
        assert console_errors(browser) == [], page
        shot = tmp_path / f"console-{page.replace('/', '-') or 'overview'}.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 2 * len(blank), f"{page}: the screenshot looks blank"

    with urllib.request.urlopen(f"{served}/v1/collections/main/checkpoint") as answer:
        size = int(answer.read().decode().split("\n")[1])
    browser.get(f"{served}/console/")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-collection="main"]')
    assert row.find_element(By.CLASS_NAME, "log-size").text == str(size)
    assert row.find_element(By.CSS_SELECTOR, '.listed[data-signal="pdq"]').text == "pdq 6"
    browser.get(f"{served}/console/members")
    rows = {
        tr.get_attribute("data-key"): tr for tr in browser.find_elements(By.CSS_SELECTOR, "#members tbody tr")
    }
    acme = rows[federation.members["acme"].key_id]
    assert acme.find_elements(By.TAG_NAME, "td")[7].text == "6"  # batches in the recent window

    browser.get(f"{served}/console/lookup")
    browser.find_element(By.NAME, "hashes").send_keys(f"pdq:{flip(pdq(3), 6)}")
    browser.find_element(By.CSS_SELECTOR, "main form button").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "results"))
    match = browser.find_element(By.CSS_SELECTOR, "#results .match")
    assert pdq(3) in match.text and match.find_element(By.CLASS_NAME, "distance").text == "6"
    assert console_errors(browser) == []


def _blank_screenshot(browser: Any) -> bytes:
    """The size of a screenshot of an empty page of the same window, to tell a blank page by."""
    browser.get("data:text/html,<!doctype html><title>blank</title>")
    png: bytes = browser.get_screenshot_as_png()
    return png
