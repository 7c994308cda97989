"""The web chat page (``GET /``) driven in headless Chromium against a real ``lmlab serve``.

A tiny char-level GPT (the ``trained_run`` fixture) answers; its text is gibberish, so these tests
check the mechanics: the model name loads, an answer streams in, the speed line appears, Clear works.
Selenium never downloads anything: the Chromium and chromedriver binaries are given explicitly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import live_server


def _find(names: list[str]) -> str | None:
    """The first of these executables that exists (an absolute path, or one on PATH)."""
    for name in names:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


CHROMIUM = _find(["/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"])
CHROMEDRIVER = _find(["/usr/bin/chromedriver", "chromedriver"])

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless browser test needs the chromium and chromedriver binaries "
                "(Debian/Ubuntu: apt-get install chromium chromium-driver)", allow_module_level=True)

# With a browser present, selenium is required (it is a test dependency), so a missing one fails loudly.
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ANSWER_TIMEOUT = 30


@pytest.fixture(scope="module")
def server(trained_run):
    """``lmlab serve`` on the tiny checkpoint, on a free port; yields its base URL."""
    with live_server(trained_run) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,800", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, url: str) -> None:
    """Load the page, wait for the model name, and set deterministic, short answers."""
    browser.get(url + "/")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "model-name").text.strip())
    assert browser.find_element(By.ID, "model-name").text.strip() != "(unavailable)"
    # The settings panel is collapsed; set values from JS so it does not matter whether it is open.
    browser.execute_script(
        "document.getElementById('max-tokens').value = '20';"
        "document.getElementById('temperature').value = '0';")


def _wait_for_answer(browser):
    """The last assistant message once its stats line says it is complete; fails on an error bubble."""
    def done(d):
        errors = d.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        if errors:
            pytest.fail("the page shows an error: " + errors[-1].text)
        answers = d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
        if not answers:
            return False
        stats = answers[-1].find_elements(By.CSS_SELECTOR, ".stats")
        if answers[-1].text.strip() and stats and "tokens/s" in stats[0].text:
            return answers[-1]
        return False

    return WebDriverWait(browser, ANSWER_TIMEOUT).until(done)


def test_chat_page_streams_an_answer_and_clears(server, browser):
    _open(browser, server)
    browser.find_element(By.ID, "input").send_keys("hello")
    browser.find_element(By.ID, "send").click()

    answer = _wait_for_answer(browser)
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    assert "tokens" in stats and "tokens/s" in stats, stats
    user = browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")
    assert len(user) == 1 and "hello" in user[0].text
    assert browser.find_element(By.ID, "send").is_enabled()  # re-enabled after the answer

    artifacts = Path(os.environ.get("LMLAB_TEST_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "chat_page.png"))

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .msg") == []


def test_answer_is_rendered_incrementally(server, browser):
    """Enter sends, and the answer grows chunk by chunk (each snapshot a prefix of the next)."""
    _open(browser, server)
    # Record every distinct text of the streaming assistant message, as the page changes it.
    browser.execute_script("""
        window.__snapshots = [];
        new MutationObserver(() => {
          const all = document.querySelectorAll('#messages .msg.assistant .content');
          const text = all.length ? all[all.length - 1].textContent : '';
          const s = window.__snapshots;
          if (text && s[s.length - 1] !== text) s.push(text);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    browser.find_element(By.ID, "input").send_keys("hello", Keys.ENTER)
    answer = _wait_for_answer(browser)

    snapshots = browser.execute_script("return window.__snapshots;")
    final = answer.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
    assert len(snapshots) > 1, snapshots
    assert snapshots[-1] == final
    assert all(b.startswith(a) for a, b in zip(snapshots, snapshots[1:])), snapshots
    # The stats count agrees with the number of streamed chunks or the server's usage count (<= max tokens).
    n_tokens = int(answer.find_element(By.CSS_SELECTOR, ".stats").text.split()[0])
    assert 1 <= n_tokens <= 20
    assert browser.find_element(By.ID, "input").get_attribute("value") == ""
