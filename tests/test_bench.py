"""The benchmark's own parts: the fast fake speaks Ollama's stream format, and the whole script runs.

Speed is never asserted here (shared machines are noisy); `make bench` measures it.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.procs import start_fake

ROOT = Path(__file__).resolve().parent.parent


def test_fast_fake_streams_ndjson_on_keep_alive_connections(tmp_path: Path) -> None:
    fake = start_fake(tmp_path)
    try:
        with httpx.Client(base_url=fake.url) as client:
            bodies = [
                client.post("/api/generate", json={"model": "bench", "prompt": prompt}).text
                for prompt in ("tokens=3", "tokens=2 interval_ms=5", "hello")
            ]
            tags = client.get("/api/tags").json()
    finally:
        fake.stop()

    events = [[json.loads(line) for line in body.splitlines()] for body in bodies]
    assert [len(answer) for answer in events] == [4, 3, 17]  # tokens plus the final line; 16 by default
    for answer in events:
        *tokens, final = answer
        assert all(token["response"].startswith("t") and not token["done"] for token in tokens)
        assert (final["done"], final["eval_count"]) == (True, len(tokens))
    assert tags["models"][0]["name"] == "bench:latest"


def test_fast_fake_streams_openai_text_and_tool_call_fragments(tmp_path: Path) -> None:
    # bench/streams.py's tool-call relay row compares these two streams chunk for chunk.
    fake = start_fake(tmp_path)
    try:
        with httpx.Client(base_url=fake.url) as client:
            streams = {
                knob: client.post("/v1/chat/completions", json={"messages": [{"content": f"tokens=3{knob}"}]}).text
                for knob in ("", " tools=1")
            }
    finally:
        fake.stop()

    def frames(body: str) -> list[dict]:
        data = [line[6:] for line in body.split("\n\n") if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(item) for item in data[:-1]]

    text, tools = frames(streams[""]), frames(streams[" tools=1"])
    assert [f["choices"][0]["delta"]["content"][0] for f in text[:3]] == ["t", "t", "t"]
    assert [f["choices"][0]["finish_reason"] for f in text if f["choices"]][-1] == "stop"
    calls = [f["choices"][0]["delta"]["tool_calls"][0] for f in tools if f["choices"] and f["choices"][0]["delta"]]
    assert len(calls) == 5 and calls[0]["function"]["name"] == "lookup" and calls[0]["id"] == "call_bench"
    assert json.loads("".join(call["function"]["arguments"] for call in calls))["a"].count("t") == 3
    assert [f["choices"][0]["finish_reason"] for f in tools if f["choices"]][-1] == "tool_calls"
    assert tools[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.timeout(300)
def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--output", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "latest.json").read_text())
    assert figures["ws_stream_errors"] == 0
    assert figures["ws_tokens_received"] == 50 * 100
    assert figures["two_worker_log"]["log_bad_lines"] == 0
    assert figures["two_worker_log"]["log_unique_ids"] == figures["two_worker_log"]["log_lines"]
    assert figures["dialect_errors"] == 0
    for strategy in ("least_busy", "random", "round_robin"):
        assert figures[f"fleet_{strategy}_errors"] == 0
        assert figures[f"fleet_{strategy}_logged"] == 40  # every stream's log line names one of the four hosts
        assert sum(figures[f"fleet_{strategy}_served_pct"]) == pytest.approx(100)
    assert figures["fleet_round_robin_served_pct"] == [25, 25, 25, 25]
    table = (tmp_path / "latest.md").read_text()
    assert table.count("\n| ") == 42  # the header row and one row per measure
    assert figures["vocab_rev"] == "9e87914" and figures["vocab_errors"] == 0
    assert figures["openai_tool_call_relay_us_per_chunk"] > 0 and figures["openai_text_relay_us_per_chunk"] > 0
    assert "| Relay CPU per chunk of a streamed tool call (OpenAI-compatible upstream, /v1 streamed) |" in table
    assert "| Requests/s, concurrency 16 |" in result.stdout
    assert "| Issue 15 on: added latency, concurrency 1, median |" in table
    assert figures["gw_previous_rev"] == "620fb0c" and figures["gw_plain_errors"] == figures["gw_on_errors"] == 0
