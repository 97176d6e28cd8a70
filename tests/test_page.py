"""The playground page (app/static) in real headless Chromium, against MiniVault and the fake Ollama on loopback.

One browser serves the whole module; screenshots land in test-artifacts/page/.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from websockets.sync.client import connect

from app import __version__
from app.main import create_app
from app.web.auth import key_id
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.browser import console_errors, screenshot, start_chromium
from tests.support.fake_ollama import DEFAULT_MODELS, SPECIAL_MODELS, FakeOllama
from tests.support.servers import REPO_ROOT, RunningServer, serve_in_thread

KEY = "k1-playground"
ALL_MODELS = DEFAULT_MODELS + SPECIAL_MODELS

# The last answer in the transcript, read in one go so its state and text belong together.
READ_ANSWER = """
const answers = document.querySelectorAll('#transcript .answer');
const answer = answers[answers.length - 1];
if (!answer) return null;
const part = (name) => answer.querySelector('.meta .' + name)?.textContent ?? null;
return {count: answers.length, state: answer.dataset.state, id: answer.dataset.id ?? null,
        text: answer.querySelector('.text').textContent, status: answer.querySelector('.status').textContent,
        ttft: part('ttft'), rate: part('rate'), tokens: part('tokens'), queue: part('queue'), cut: part('cut')};
"""
FINISHED = ("done", "cancelled", "error")


@dataclass
class Gateway:
    server: RunningServer
    log_path: Path

    @property
    def url(self) -> str:
        return self.server.url


@contextmanager
def gateway_running(folder: Path, **overrides: Any) -> Iterator[Gateway]:
    log_path = folder / "log.jsonl"
    with serve_in_thread(create_app(make_settings(log_path=log_path, **overrides))) as server:
        yield Gateway(server, log_path)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """The shared browser with an empty console buffer; its last state is saved as test-artifacts/page/<test>.png."""
    console_errors(browser)
    yield browser
    screenshot(browser, f"page/{request.node.name}")


@pytest.fixture(scope="module")
def upstream_fake() -> FakeOllama:
    return FakeOllama()


@pytest.fixture(scope="module")
def upstream(upstream_fake: FakeOllama) -> Iterator[RunningServer]:
    with serve_in_thread(upstream_fake, lifespan="off") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # One generation at a time, so a second client's prompt queues.
    folder = tmp_path_factory.mktemp("gateway")
    with gateway_running(folder, ollama_base_url=upstream.url, max_concurrency=1) as running:
        yield running


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 15.0) -> Any:
    """`condition`'s first truthy value, polled every 20 ms; TimeoutException after `timeout` seconds."""
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(f"{url}/")
    wait_for(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")


def send(driver: WebDriver, prompt: str) -> None:
    driver.find_element(By.ID, "prompt").send_keys(prompt, Keys.ENTER)


def read_answer(driver: WebDriver) -> dict[str, Any] | None:
    return driver.execute_script(READ_ANSWER)


def finished_answer(driver: WebDriver, count: int | None = None) -> dict[str, Any]:
    """The last answer once it has ended (and is the `count`th, if given)."""

    def ended(d: WebDriver) -> dict[str, Any] | None:
        answer = read_answer(d)
        if answer is None or answer["state"] not in FINISHED or (count is not None and answer["count"] != count):
            return None
        return answer

    return wait_for(driver, ended)


def logged(driver: WebDriver, gateway: Gateway, exchange_id: str) -> dict[str, Any]:
    """The log line of an exchange, once the writer has flushed it."""

    def found(_: WebDriver) -> dict[str, Any] | None:
        try:
            records = read_log(gateway.log_path)
        except ValueError:  # caught halfway through writing a line
            return None
        matches = [record for record in records if record["id"] == exchange_id]
        assert len(matches) <= 1
        return matches[0] if matches else None

    return wait_for(driver, found)


def upstream_requests(fake: FakeOllama, prompt: str) -> list[dict[str, Any]]:
    return [request for request in fake.requests if request.get("prompt") == prompt]


def to_fixed(driver: WebDriver, value: float, digits: int) -> str:
    """`value.toFixed(digits)` as the page's JavaScript formats it."""
    return driver.execute_script("return arguments[0].toFixed(arguments[1])", value, digits)


def model_names(driver: WebDriver) -> list[str]:
    return [option.get_attribute("value") for option in Select(driver.find_element(By.ID, "model")).options]


def network_error(url: str, status: str) -> str:
    return f"{url} - Failed to load resource: the server responded with a status of {status}"


def test_answer_streams_token_by_token_and_ends_as_logged_with_its_timings(
    page: WebDriver, gateway: Gateway, upstream_fake: FakeOllama
) -> None:
    open_page(page, gateway.url)
    assert not page.find_element(By.ID, "key-form").is_displayed()
    assert model_names(page) == ALL_MODELS
    picker = Select(page.find_element(By.ID, "model"))
    assert picker.first_selected_option.get_attribute("value") == "tinyllama:1.1b-chat"
    picker.select_by_value("drip:latest")
    page.find_element(By.ID, "settings-toggle").click()
    page.find_element(By.ID, "system").send_keys("Count slowly.")
    page.find_element(By.ID, "temperature").send_keys("0.5")
    page.find_element(By.ID, "max-tokens").send_keys("20")
    prompt_box = page.find_element(By.ID, "prompt")
    prompt_box.send_keys("Count for me,", Keys.SHIFT, Keys.ENTER, Keys.NULL, "please")
    assert prompt_box.get_property("value") == "Count for me,\nplease"
    prompt_box.send_keys(Keys.ENTER)

    partial = wait_for(page, lambda d: (a := read_answer(d)) and a["state"] == "streaming" and a["text"] and a)
    png = screenshot(page, "page/streaming")
    final = finished_answer(page)
    record = logged(page, gateway, final["id"])

    expected = "".join(f"d{i} " for i in range(20))
    assert expected.startswith(partial["text"]) and len(partial["text"]) < len(expected)
    assert (final["state"], final["text"], final["status"]) == ("done", expected, "")
    assert (record["status"], record["response"], record["model"]) == ("ok", expected, "drip:latest")
    assert (record["prompt"], record["system"]) == ("Count for me,\nplease", "Count slowly.")
    assert page.find_element(By.CSS_SELECTOR, ".turn:last-child .prompt").get_property("textContent") == (
        "Count for me,\nplease"
    )
    [sent] = upstream_requests(upstream_fake, "Count for me,\nplease")
    assert sent["options"] == {"temperature": 0.5, "num_predict": 20}
    assert sent["messages"][0] == {"role": "system", "content": "Count slowly."}
    ttft, total, tokens = record["ttft_ms"], record["latency_ms"], record["completion_tokens"]
    assert tokens == 20
    assert final["ttft"] == f"first token {to_fixed(page, ttft, 0)} ms"
    assert final["rate"] == f"{to_fixed(page, (tokens - 1) * 1000 / (total - ttft), 1)} tokens/s"
    assert final["tokens"] == "20 tokens"
    assert (record["done_reason"], final["cut"]) == ("length", "cut at the token limit")
    assert png == REPO_ROOT / "test-artifacts/page/streaming.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert console_errors(page) == []


def test_stop_ends_the_answer_and_the_log_records_it_as_cancelled(
    page: WebDriver, gateway: Gateway, upstream_fake: FakeOllama
) -> None:
    open_page(page, gateway.url)
    Select(page.find_element(By.ID, "model")).select_by_value("slow:latest")
    send(page, "Go on and on")
    wait_for(page, lambda d: (a := read_answer(d)) and "w2 " in a["text"])
    disconnects = upstream_fake.disconnects
    page.find_element(By.ID, "stop").click()

    final = finished_answer(page)
    record = logged(page, gateway, final["id"])
    assert (final["state"], final["status"]) == ("cancelled", "Stopped.")
    assert (record["status"], record["done_reason"]) == ("cancelled", "cancelled")
    assert final["text"] == record["response"]
    shown = len(final["text"].split())
    assert final["text"] == "".join(f"w{i} " for i in range(shown))
    assert 3 <= shown < 400
    upstream_fake.wait_until(lambda fake: fake.disconnects == disconnects + 1)
    assert page.find_element(By.ID, "stop").get_property("disabled") is True
    assert page.find_element(By.ID, "send").get_property("disabled") is False
    assert console_errors(page) == []


def test_a_prompt_waiting_for_a_slot_shows_its_queue_position(page: WebDriver, gateway: Gateway) -> None:
    open_page(page, gateway.url)
    with connect(f"{gateway.server.ws_url}/ws/generate") as other:
        other.send(json.dumps({"prompt": "hold the only slot", "model": "slow:latest"}))
        while json.loads(other.recv(timeout=10))["type"] != "token":
            pass
        send(page, "Wait your turn")
        queued = wait_for(page, lambda d: (a := read_answer(d)) and a["state"] == "queued" and a)
        assert queued["status"] == "Queued: position 1"
        assert page.find_element(By.ID, "state").text == "Waiting for a free slot (position 1)"
        other.send(json.dumps({"type": "cancel"}))
        while json.loads(other.recv(timeout=10))["type"] != "done":
            pass

    final = finished_answer(page)
    record = logged(page, gateway, final["id"])
    assert (final["state"], final["text"], final["status"]) == ("done", "Wait your turn", "")
    assert record["response"] == "Wait your turn"
    assert record["queue_ms"] > 0
    assert final["queue"] == f"queued {to_fixed(page, record['queue_ms'], 0)} ms"
    assert console_errors(page) == []


def test_a_stopped_backend_shows_the_errors_message(page: WebDriver, tmp_path: Path) -> None:
    with gateway_running(tmp_path, ollama_base_url=closed_port_url()) as down:
        models_error = httpx.get(f"{down.url}/models").json()["error"]
        open_page(page, down.url)
        assert models_error["code"] == "backend_unavailable"
        assert page.find_element(By.ID, "notice").text == f"backend_unavailable {models_error['message']}"
        assert model_names(page) == []
        send(page, "Anyone there?")
        final = finished_answer(page)
        record = logged(page, down, final["id"])
        assert record["status"] == "error" and record["error"]["code"] == "backend_unavailable"
        assert (final["state"], final["text"]) == ("error", "")
        assert final["status"] == f"backend_unavailable {record['error']['message']}"
        # Chromium reports every HTTP error status on the console; this one is expected, nothing else is.
        assert console_errors(page) == [network_error(f"{down.url}/models", "503 (Service Unavailable)")]


def test_a_conversation_continues_with_its_turns_then_reopens_and_is_deleted(
    page: WebDriver, gateway: Gateway, upstream_fake: FakeOllama
) -> None:
    open_page(page, gateway.url)
    send(page, "Name a colour.")
    first = finished_answer(page, count=1)
    send(page, "And another one?")
    second = finished_answer(page, count=2)
    Select(page.find_element(By.ID, "model")).select_by_value("drip:latest")
    page.find_element(By.ID, "settings-toggle").click()
    page.find_element(By.ID, "max-tokens").send_keys("12")
    send(page, "Now count to twelve.")
    wait_for(page, lambda d: (a := read_answer(d))["count"] == 3 and a["state"] == "streaming" and a["text"])
    screenshot(page, "page/mid-conversation")
    third = finished_answer(page, count=3)

    records = [logged(page, gateway, answer["id"]) for answer in (first, second, third)]
    conversation = records[0]["conversation_id"]
    assert conversation is not None
    assert [record["conversation_id"] for record in records] == [conversation] * 3
    assert [answer["text"] for answer in (first, second)] == ["Name a colour.", "And another one?"]
    assert third["text"] == "".join(f"d{i} " for i in range(12))
    [sent] = upstream_requests(upstream_fake, "Now count to twelve.")
    assert sent["messages"] == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Name a colour."},
        {"role": "user", "content": "And another one?"},
        {"role": "assistant", "content": "And another one?"},
        {"role": "user", "content": "Now count to twelve."},
    ]

    item = f'#chats li[data-id="{conversation}"]'
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, item))
    pick = page.find_element(By.CSS_SELECTOR, f"{item} .pick")
    assert (pick.text, pick.get_attribute("aria-current")) == ("Name a colour.", "true")
    page.find_element(By.ID, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "#transcript .turn") == []
    assert pick.get_attribute("aria-current") is None
    pick.click()
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#transcript .turn")) == 3)
    shown = [
        (turn.find_element(By.CSS_SELECTOR, ".prompt").get_property("textContent"),
         turn.find_element(By.CSS_SELECTOR, ".answer .text").get_property("textContent"))
        for turn in page.find_elements(By.CSS_SELECTOR, "#transcript .turn")
    ]  # fmt: skip
    assert shown == [(record["prompt"], record["response"]) for record in records]

    page.find_element(By.CSS_SELECTOR, f"{item} .delete").click()
    wait_for(page, lambda d: not d.find_elements(By.CSS_SELECTOR, item))
    assert page.find_elements(By.CSS_SELECTOR, "#transcript .turn") == []
    assert httpx.get(f"{gateway.url}/conversations/{conversation}").status_code == 404
    assert console_errors(page) == []


def test_history_search_finds_an_earlier_exchange(page: WebDriver, gateway: Gateway) -> None:
    open_page(page, gateway.url)
    send(page, "Tell me about the quokka")
    record = logged(page, gateway, finished_answer(page)["id"])
    # The history database is written after the log line: wait until the server can find it.
    wait_for(page, lambda _: httpx.get(f"{gateway.url}/history", params={"q": "quokka"}).json()["items"])

    search = page.find_element(By.ID, "history-q")
    search.send_keys("quokka", Keys.ENTER)
    status = page.find_element(By.ID, "history-status")
    wait_for(page, lambda _: status.text == "Best matches for \u201cquokka\u201d")
    found = [
        (item.get_attribute("data-id"), item.find_element(By.CSS_SELECTOR, ".q").text,
         item.find_element(By.CSS_SELECTOR, ".a").text)
        for item in page.find_elements(By.CSS_SELECTOR, "#history .exchange")
    ]  # fmt: skip
    assert found == [(record["id"], "Tell me about the quokka", "Tell me about the quokka")]
    page.find_element(By.CSS_SELECTOR, "#history .exchange").click()
    assert page.find_element(By.ID, "prompt").get_property("value") == "Tell me about the quokka"

    search.clear()
    search.send_keys("wombat", Keys.ENTER)
    wait_for(page, lambda _: status.text == "Nothing matches \u201cwombat\u201d")
    assert page.find_elements(By.CSS_SELECTOR, "#history .exchange") == []
    assert console_errors(page) == []


def test_with_keys_on_the_page_asks_for_one_keeps_it_and_then_works(
    page: WebDriver, upstream: RunningServer, tmp_path: Path
) -> None:
    with gateway_running(tmp_path, ollama_base_url=upstream.url, api_keys=KEY) as locked:
        missing = httpx.get(f"{locked.url}/models").json()["error"]["message"]
        wrong = httpx.get(f"{locked.url}/models", headers={"X-API-Key": "nope"}).json()["error"]["message"]
        open_page(page, locked.url)
        form, reason, field = (page.find_element(By.ID, name) for name in ("key-form", "key-reason", "key"))
        assert form.is_displayed() and reason.text == missing
        assert not page.find_element(By.ID, "notice").is_displayed()  # the form says it; no second banner
        assert model_names(page) == []

        field.send_keys("nope", Keys.ENTER)
        wait_for(page, lambda _: reason.text == wrong and form.is_displayed())
        field.clear()
        field.send_keys(KEY, Keys.ENTER)
        wait_for(page, lambda d: model_names(d) == ALL_MODELS)
        assert not form.is_displayed()
        assert page.execute_script("return localStorage.getItem('minivault.apiKey')") == KEY

        send(page, "Hello with a key")
        final = finished_answer(page)
        record = logged(page, locked, final["id"])
        assert (final["state"], final["text"]) == ("done", "Hello with a key")
        assert (record["status"], record["key_id"], record["endpoint"]) == ("ok", key_id(KEY), "ws")

        open_page(page, locked.url)  # the key comes back from localStorage
        assert not page.find_element(By.ID, "key-form").is_displayed()
        assert model_names(page) == ALL_MODELS
        assert console_errors(page) == [network_error(f"{locked.url}/models", "401 (Unauthorized)")] * 2


def test_markup_in_a_prompt_and_its_answer_is_shown_as_text_and_never_runs(page: WebDriver, gateway: Gateway) -> None:
    prompt = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
    open_page(page, gateway.url)
    send(page, prompt)
    final = finished_answer(page)
    record = logged(page, gateway, final["id"])
    assert final["text"] == record["response"] == prompt
    assert page.find_element(By.CSS_SELECTOR, ".turn:last-child .prompt").get_property("textContent") == prompt
    # The history list and the conversation titles show it too, once refreshed after the answer.
    wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "#history .exchange .q").text == prompt)
    wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "#chats .pick").text == prompt)
    assert page.execute_script("return window.pwned") is None
    assert page.execute_script("return document.querySelectorAll('img, b, script:not([src])').length") == 0
    assert console_errors(page) == []


def test_at_phone_width_nothing_scrolls_sideways(page: WebDriver, gateway: Gateway) -> None:
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    scroll_width = "return document.documentElement.scrollWidth"
    try:
        open_page(page, gateway.url)
        assert page.execute_script("return window.innerWidth") == 390
        assert page.execute_script(scroll_width) <= 390
        send(page, "A long word: " + "x" * 300 + " and a https://example.invalid/" + "y" * 200 + " link")
        assert finished_answer(page)["state"] == "done"
        assert page.execute_script(scroll_width) <= 390
        page.find_element(By.ID, "menu").click()
        page.find_element(By.ID, "settings-toggle").click()
        assert page.find_element(By.ID, "side").is_displayed()
        assert page.execute_script(scroll_width) <= 390
        screenshot(page, "page/phone")
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert console_errors(page) == []


def test_swagger_ui_and_redoc_render_offline(page: WebDriver, gateway: Gateway) -> None:
    schema = httpx.get(f"{gateway.url}/openapi.json").json()
    described = [operation for path in schema["paths"].values() for operation in path.values()]
    operations = {operation["operationId"] for operation in described}
    assert len(operations) == len(described) > 10

    page.get(f"{gateway.url}/docs")
    # Swagger UI shows an operation under each of its tags, in a block named `operations-<tag>-<operationId>`.
    blocks = sum(len(operation.get("tags") or ["default"]) for operation in described)
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == blocks)
    shown = {block.get_attribute("id").rsplit("-", 1)[1] for block in page.find_elements(By.CSS_SELECTOR, ".opblock")}
    assert shown == operations
    assert page.title == "MiniVault - Swagger UI"
    assert console_errors(page) == []
    screenshot(page, "page/swagger-ui")

    page.get(f"{gateway.url}/redoc")
    rendered = (
        "return [...document.querySelectorAll('[data-section-id*=\"operation/\"]')]"
        ".map(e => e.dataset.sectionId.split('operation/').pop())"
    )
    wait_for(page, lambda d: set(d.execute_script(rendered)) == operations)
    assert page.find_element(By.TAG_NAME, "h1").text == f"MiniVault ({__version__})"
    assert console_errors(page) == []


# --- Security headers and HEAD (issue 15, §5) -------------------------------------------------------------------

BROWSER_LOADED = (
    "/", "/docs", "/redoc", "/static/index.html", "/static/app.js", "/static/style.css",
    "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/redoc.standalone.js",
    "/docs-assets/favicon.png",
)  # fmt: skip


def test_every_page_and_file_a_browser_loads_forbids_framing_and_sniffing(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        responses = {path: client.get(path) for path in BROWSER_LOADED}

    for path, response in responses.items():
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy.split("; "), path
        assert policy.startswith("default-src 'none'; "), path
        assert "unsafe-eval" not in policy, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["x-frame-options"] == "DENY", path
    # The playground itself runs no inline script and no inline style at all; Swagger UI only its own start-up
    # script, by hash.
    assert "'self'; style-src 'self'; connect-src" in responses["/"].headers["content-security-policy"]
    swagger = responses["/docs"].headers["content-security-policy"]
    assert "unsafe-inline" not in swagger and "script-src 'self' 'sha256-" in swagger


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc"])
def test_head_answers_like_get_without_a_body(gateway: Gateway, path: str) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        got, head = client.get(path), client.head(path)

    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-type", "content-length", "content-security-policy", "x-content-type-options"):
        assert head.headers[name] == got.headers[name], name
    assert int(head.headers["content-length"]) == len(got.content)


def test_swagger_ui_try_it_out_runs_under_its_policy(page: WebDriver, gateway: Gateway) -> None:
    page.get(f"{gateway.url}/docs")
    summary = '.opblock-summary-path[data-path="/health"]'
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, summary))[0].click()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".execute"))[0].click()

    status = ".live-responses-table .response .response-col_status"
    assert wait_for(page, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, status)]) == ["200"]
    assert console_errors(page) == []
