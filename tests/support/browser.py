"""Headless Chromium driven through selenium: Debian's chromium and chromedriver, nothing downloaded, no network.

The driver path is given, so Selenium Manager never runs (it would fetch a browser and a driver);
every host name but 127.0.0.1 resolves to nothing, so a page that reaches off the machine fails loudly.
`python -m tests.support.browser` retakes the README's docs/playground.png with the bundled model.
"""

import sys
import tempfile
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from app.main import create_app
from tests.conftest import make_settings
from tests.support.servers import REPO_ROOT, serve_in_thread

# Debian's chromium and chromium-driver packages (`make system-deps`).
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Screenshots the page tests take (git-ignored).
ARTIFACTS = REPO_ROOT / "test-artifacts"

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # tests may run as root, which Chromium's sandbox refuses
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # /dev/shm is 64 MB in containers
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,800",
)


def start_chromium(profile: Path, host_rules: str | None = None) -> WebDriver:
    """A fresh headless Chromium with its own profile folder, recording the console for `console_errors`;
    `host_rules` replaces the `--host-resolver-rules` flag (to map a made-up name to loopback)."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).is_file():
            raise RuntimeError(
                f"{program} is missing: run `make system-deps` as root (Debian chromium chromium-driver)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(host_rules if host_rules and flag.startswith("--host-resolver-rules=") else flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def console_errors(driver: WebDriver) -> list[str]:
    """The SEVERE console entries (script errors, failed loads) since the last call; reading empties the buffer."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the visible page as test-artifacts/<name>.png."""
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"Chromium could not write the screenshot {path}")
    return path


PLAYGROUND_PNG = REPO_ROOT / "docs" / "playground.png"
README_CHAT = ("Why is the sky blue?", "And why are sunsets red?", "Explain it to a five year old.")
LAST_ANSWER_TEXT = ".turn:last-child .answer .text"
DONE = '.answer[data-state="done"]'


def take_playground_screenshot(path: Path = PLAYGROUND_PNG) -> None:
    """The README's picture: a chat with the bundled SmolLM2 (embedded backend), taken while the last answer streams."""
    with tempfile.TemporaryDirectory() as folder:
        settings = make_settings(backend="embedded", embedded_context=2048, log_path=Path(folder) / "log.jsonl")
        driver = start_chromium(Path(folder) / "profile")
        try:
            with serve_in_thread(create_app(settings)) as server:
                _chat_for_the_readme(driver, server.url, path)
            if errors := console_errors(driver):
                raise AssertionError(f"the page logged errors: {errors}")
        finally:
            driver.quit()


def _chat_for_the_readme(driver: WebDriver, url: str, path: Path) -> None:
    metrics = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    wait = WebDriverWait(driver, 120, poll_frequency=0.02)
    driver.get(f"{url}/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    driver.find_element(By.ID, "settings-toggle").click()
    driver.find_element(By.ID, "system").send_keys("You are a helpful assistant. Answer briefly.")
    driver.find_element(By.ID, "temperature").send_keys("0")
    driver.find_element(By.ID, "max-tokens").send_keys("120")
    driver.find_element(By.ID, "settings-toggle").click()
    for number, prompt in enumerate(README_CHAT, start=1):
        driver.find_element(By.ID, "prompt").send_keys(prompt, Keys.ENTER)
        if number == len(README_CHAT):
            # Mid-answer: a line or two of text is out, the rest is still coming.
            wait.until(
                lambda d: len(d.find_element(By.CSS_SELECTOR, LAST_ANSWER_TEXT).get_property("textContent")) > 80
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
        wait.until(lambda d, n=number: len(d.find_elements(By.CSS_SELECTOR, DONE)) == n)


if __name__ == "__main__":
    # `python -m tests.support.browser [path]` rewrites docs/playground.png; it needs the embedded model installed
    # (requirements-embedded.txt).
    take_playground_screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else PLAYGROUND_PNG)
