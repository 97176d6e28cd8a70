"""The fake Ollama's failure modes do exactly what their names promise, so gateway tests can rely on them."""

import httpx
import orjson
import pytest

from tests.support.fake_ollama import SPECIAL_MODELS, FakeOllama
from tests.support.servers import FakeOllamaProcess, RunningServer

NEW_MODELS = ["busy:latest", "stall:latest", "stall-headers:latest", "drip:latest"]


def generate_body(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "one two three four five"}


def test_tags_lists_the_new_models(fake_server: RunningServer) -> None:
    names = [model["name"] for model in httpx.get(f"{fake_server.url}/api/tags").json()["models"]]
    assert set(NEW_MODELS) <= set(SPECIAL_MODELS)
    assert set(NEW_MODELS) <= set(names)


def test_busy_answers_503_with_ollamas_queue_full_error(fake: FakeOllama, fake_server: RunningServer) -> None:
    response = httpx.post(f"{fake_server.url}/api/generate", json=generate_body("busy:latest"))
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    fake.wait_until(lambda f: f.busy == 1)
    assert fake.started == 0  # refused before any generation starts


def test_stall_sends_two_tokens_then_nothing(fake: FakeOllama, fake_server: RunningServer) -> None:
    timeout = httpx.Timeout(5.0, read=0.5)
    with httpx.Client(timeout=timeout) as client:
        with client.stream("POST", f"{fake_server.url}/api/generate", json=generate_body("stall:latest")) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            tokens = [orjson.loads(next(lines)) for _ in range(2)]
            assert [(t["response"], t["done"]) for t in tokens] == [("s0 ", False), ("s1 ", False)]
            with pytest.raises(httpx.ReadTimeout):
                next(lines)
    # Leaving the block drops the half-read connection; the fake must see it as a disconnect.
    fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.finished == 0


def test_stall_headers_sends_headers_then_nothing(fake: FakeOllama, fake_server: RunningServer) -> None:
    timeout = httpx.Timeout(5.0, read=0.5)
    with httpx.Client(timeout=timeout) as client:
        body = generate_body("stall-headers:latest")
        with client.stream("POST", f"{fake_server.url}/api/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            with pytest.raises(httpx.ReadTimeout):
                next(response.iter_bytes())
    fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.finished == 0


def test_drip_streams_numbered_tokens_and_stops_when_the_client_leaves(
    fake: FakeOllama, fake_server: RunningServer
) -> None:
    with httpx.Client(timeout=5.0) as client:
        with client.stream("POST", f"{fake_server.url}/api/generate", json=generate_body("drip:latest")) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert [orjson.loads(next(lines))["response"] for _ in range(3)] == ["d0 ", "d1 ", "d2 "]
    fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.finished == 0


def test_process_can_be_killed_and_restarted_on_the_same_port() -> None:
    with FakeOllamaProcess() as ollama:
        url, port = ollama.url, ollama.port
        assert url == f"http://127.0.0.1:{port}"
        # An idle keep-alive connection to a killed server leaves a TIME_WAIT socket on its port once the
        # client closes it, so `restart()` below only works because uvicorn binds with SO_REUSEADDR.
        with httpx.Client(timeout=5.0) as idle, httpx.Client(timeout=5.0) as client:
            assert idle.get(f"{url}/api/version").json() == {"version": "0.0.0-fake"}
            # A stream in flight when Ollama dies is cut off, as after a real crash.
            with client.stream("POST", f"{url}/api/generate", json=generate_body("drip:latest")) as response:
                lines = response.iter_lines()
                assert orjson.loads(next(lines))["response"] == "d0 "
                ollama.kill()
                assert not ollama.running
                with pytest.raises(httpx.TransportError):
                    for _ in lines:
                        pass
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/api/version", timeout=2.0)
        ollama.restart()
        assert ollama.running
        assert ollama.port == port
        assert httpx.get(f"{url}/api/version").status_code == 200
    assert not ollama.running


def test_process_passes_delay_and_stop_is_idempotent() -> None:
    ollama = FakeOllamaProcess(delay=0.01)
    with ollama:
        body = {"model": "llama3:latest", "prompt": "a b c", "stream": True}
        response = httpx.post(f"{ollama.url}/api/generate", json=body, timeout=5.0)
        assert [orjson.loads(line)["response"] for line in response.text.splitlines()][:3] == ["a ", "b ", "c"]
        assert ollama.process is not None and "--delay" in ollama.process.args
    ollama.stop()  # a second stop after __exit__ is harmless
    assert ollama.process is None
