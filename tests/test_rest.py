"""POST /generate without streaming, against a real server and the fake Ollama over loopback."""

import socket
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread


def test_generate_returns_the_answer_and_the_documented_fields(minivault: RunningServer, log_path: Path) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "Explain gravity in one sentence."})

    assert response.status_code == 200
    body = response.json()
    assert body["response"] == "Explain gravity in one sentence."
    assert body["model"] == "tinyllama:1.1b-chat"
    assert body["done_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5}
    assert body["timings"]["total_ms"] > 0
    assert 0 < body["timings"]["ttft_ms"] <= body["timings"]["total_ms"]
    assert body["id"] == response.headers["x-request-id"]
    minivault.stop()
    [line] = read_log(log_path)
    assert line["id"] == body["id"]
    assert line["endpoint"] == "rest"
    assert line["status"] == "ok"
    assert line["response"] == body["response"]


def test_client_request_id_is_echoed_and_logged(minivault: RunningServer, log_path: Path) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "hi"}, headers={"X-Request-ID": "trace-42.a:b"})

    assert response.headers["x-request-id"] == "trace-42.a:b"
    assert response.json()["id"] == "trace-42.a:b"
    minivault.stop()
    assert read_log(log_path)[0]["id"] == "trace-42.a:b"


def test_unsafe_request_id_is_replaced(minivault: RunningServer) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "hi"}, headers={"X-Request-ID": "a b\tc"})

    assert response.headers["x-request-id"] != "a b\tc"
    assert len(response.headers["x-request-id"]) == 32


def test_model_system_and_options_are_passed_through(minivault: RunningServer, fake: FakeOllama) -> None:
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "num_predict": 2,
        "seed": 7,
        "stop": ["\n"],
        "num_ctx": 512,
    }
    response = httpx.post(
        f"{minivault.url}/generate",
        json={"prompt": "one two three", "model": "llama3", "system": "Be brief.", "options": options},
    )

    assert response.status_code == 200
    assert response.json()["response"] == "one two "
    assert response.json()["done_reason"] == "length"
    assert fake.requests == [
        {"model": "llama3", "prompt": "one two three", "stream": True, "system": "Be brief.", "options": options}
    ]


@pytest.mark.parametrize(
    ("body", "content", "phrase"),
    [
        ({"prompt": "   "}, None, "prompt: must not be blank"),
        ({}, None, "prompt: is required"),
        ({"prompt": 5}, None, "prompt: Input should be a valid string"),
        ({"prompt": "hi", "temperature": 1}, None, "temperature: unknown field"),
        (
            {"prompt": "hi", "options": {"temperature": "hot"}},
            None,
            "options.temperature: Input should be a valid number",
        ),
        ({"prompt": "hi", "options": {"num_gpus": 1}}, None, "options.num_gpus: unknown field"),
        (None, b'{"prompt": "hi"', "the body is not valid JSON"),
        (None, b"", "the body is empty"),
        (None, b'["hi"]', "the body must be a JSON object"),
        ({"prompt": "x" * 101}, None, "prompt: is 101 characters; the limit is 100 (MINIVAULT_MAX_PROMPT_CHARS)"),
    ],
)
def test_invalid_requests_get_422_naming_the_field_and_are_logged(
    fake_server: RunningServer, log_path: Path, fake: FakeOllama, body: object, content: bytes | None, phrase: str
) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, max_prompt_chars=100)
    with serve_in_thread(create_app(settings)) as server:
        if content is None:
            response = httpx.post(f"{server.url}/generate", json=body)
        else:
            response = httpx.post(
                f"{server.url}/generate", content=content, headers={"content-type": "application/json"}
            )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert phrase in error["message"]
    assert error["id"] == response.headers["x-request-id"]
    assert fake.requests == []
    [line] = read_log(log_path)
    assert (line["status"], line["error"]["code"], line["id"]) == ("error", "invalid_request", error["id"])


def test_json_sent_as_a_form_is_refused_with_415(minivault: RunningServer) -> None:
    # curl -d without -H sends application/x-www-form-urlencoded, as a web page's form can: never read as JSON.
    response = httpx.post(
        f"{minivault.url}/generate",
        content=b'{"prompt": "hello there"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )

    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("GET", "/generate", 405, "method_not_allowed")],
)
def test_unknown_routes_use_the_error_shape(
    minivault: RunningServer, method: str, path: str, status: int, code: str
) -> None:
    response = httpx.request(method, f"{minivault.url}{path}")

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["id"] == response.headers["x-request-id"]
    assert "detail" not in response.json()


def test_missing_model_is_404_listing_installed_models(minivault: RunningServer, log_path: Path) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "hi", "model": "mistral:7b"})

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "tinyllama:1.1b-chat" in error["message"]
    assert "ollama pull mistral:7b" in error["message"]
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["status"], line["error"]["code"], line["model"]) == ("error", "model_not_found", "mistral:7b")


def test_stopped_ollama_is_503_naming_the_url(log_path: Path) -> None:
    url = closed_port_url()
    with serve_in_thread(create_app(make_settings(ollama_base_url=url, log_path=log_path))) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "hi"})

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert url in error["message"]
    assert "ollama serve" in error["message"]
    assert read_log(log_path)[0]["error"]["code"] == "backend_unavailable"


def test_older_read_timeout_setting_still_bounds_a_hanging_ollama(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, read_timeout=0.3)
    with serve_in_thread(create_app(settings)) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "hi", "model": "hang"})

    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "backend_timeout"
    assert "0.3 s" in error["message"]
    assert "MINIVAULT_FIRST_TOKEN_TIMEOUT=0.3" in error["message"]
    fake.wait_until(lambda f: f.disconnects == 1)


@pytest.mark.parametrize(
    ("model", "phrase"),
    [
        ("fail-500", "Ollama answered 500: llama runner process has terminated"),
        ("error-line", "Ollama: an error was encountered while running the model"),
        ("no-done", "before its final 'done' line"),
        ("garbage", "a line that is not JSON"),
        ("break", "the connection to Ollama"),
    ],
)
def test_upstream_failures_are_502_with_ollamas_text(
    minivault: RunningServer, log_path: Path, model: str, phrase: str
) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "alpha beta gamma", "model": model})

    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_error"
    assert phrase in error["message"]
    assert "Traceback" not in response.text
    minivault.stop()
    [line] = read_log(log_path)
    assert line["status"] == "error"
    assert line["error"]["code"] == "backend_error"


@pytest.mark.parametrize("prompt", ["Привет 👋🏽 世界 — שָׁלוֹם עולם مرحبا", "🧠🔥 e\u0301 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
def test_non_ascii_round_trips_through_api_and_log(minivault: RunningServer, log_path: Path, prompt: str) -> None:
    # The "split" model cuts every NDJSON line into 3-byte pieces, splitting multi-byte characters.
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": prompt, "model": "split"})

    assert response.status_code == 200
    assert response.json()["response"] == prompt
    minivault.stop()
    [line] = read_log(log_path)
    assert line["prompt"] == prompt
    assert line["response"] == prompt
    assert prompt.encode() in log_path.read_bytes()


def test_client_hanging_up_cancels_the_upstream_request(
    minivault: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    body = b'{"prompt": "x", "model": "slow"}'
    with socket.create_connection((minivault.host, minivault.port)) as conn:
        conn.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        fake.wait_until(lambda f: f.started == 1)
    # The socket is closed; Ollama would otherwise generate all 400 tokens for nobody.
    fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.finished == 0
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["endpoint"], line["status"], line["done_reason"]) == ("rest", "cancelled", "cancelled")


def test_upstream_connections_are_reused(minivault: RunningServer, fake: FakeOllama) -> None:
    for prompt in ("one", "two", "three"):
        assert httpx.post(f"{minivault.url}/generate", json={"prompt": prompt}).status_code == 200

    # One pooled keep-alive connection carried all three: the same client port each time.
    assert len(fake.client_ports) == 3
    assert len(set(fake.client_ports)) == 1
