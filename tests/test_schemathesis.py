"""Schemathesis against a live MiniVault and the fake Ollama: every documented operation, every check.

The schemathesis CLI runs in a subprocess exactly as one would by hand (`schemathesis run --checks all URL`),
once without API keys and once with a key passed as a Bearer header. A run fails on any failed check,
on any error, and on warnings that mean part of the schema went untested (an unresolvable `$ref` is only
a warning to schemathesis, and the operation behind it would otherwise pass while barely tested).
A failure prints the command and schemathesis' report, with a curl line per failing case; to rerun by hand,
serve MiniVault in front of `python -m tests.support.fake_ollama` and point the same command at it.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings
from tests.support.servers import RunningServer, serve_in_thread

API_KEY = "test-key"
# Warnings about the schema or the run itself, as opposed to statistics about the generated data.
FAIL_ON_WARNINGS = [
    "unresolvable_reference",
    "missing_deserializer",
    "unsupported_regex",
    "unused_openapi_auth",
    "missing_auth",
]
# Bounded: about 2-10 s per run on a 2-core machine. A fixed seed keeps CI reproducible; change it
# (or raise --max-examples) locally to explore further.
OPTIONS = [
    "--checks", "all",
    "--phases", "examples,coverage,fuzzing",
    "--max-examples", "50",
    "--seed", "1",
    "--workers", "1",
    "--request-timeout", "15",
    "--generation-database", "none",
    "--continue-on-failure",
    "--output-sanitize", "false",  # the key is a test key: print curl lines that reproduce as they are
    "--no-color",
    # Routes passed through to Ollama answer in Ollama's own terms; tests/test_ollama_api.py covers them.
    "--exclude-tag", "Ollama pass-through",
]  # fmt: skip


def run_schemathesis(
    server: RunningServer, tmp_path: Path, headers: list[str]
) -> tuple[subprocess.CompletedProcess[str], dict]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(f"[warnings]\nfail-on = {json.dumps(FAIL_ON_WARNINGS)}\n")
    report = tmp_path / "schemathesis-report.json"
    header_args = [arg for header in headers for arg in ("--header", header)]
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", f"{server.url}/openapi.json", *OPTIONS, *header_args,
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    # Its own working directory, so nothing it writes lands in the repository.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert report.exists(), f"schemathesis wrote no report (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("api_keys", [None, API_KEY], ids=["no-keys", "api-key"])
def test_schemathesis_finds_nothing(
    fake_server: RunningServer, log_path: Path, tmp_path: Path, api_keys: str | None
) -> None:
    # An admin key: it reaches every operation, model management included (an ordinary key gets 403 there).
    overrides = {"admin_keys": api_keys} if api_keys else {}
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, **overrides)
    headers = [f"Authorization: Bearer {api_keys}"] if api_keys else []
    with serve_in_thread(create_app(settings)) as server:
        if api_keys:
            # The keyed run must really be keyed: without the header, a protected route refuses.
            assert httpx.get(f"{server.url}/models").status_code == 401
        result, report = run_schemathesis(server, tmp_path, headers)

    output = f"$ {' '.join(result.args)}\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, output
    assert report["failures"] == [] and report["errors"] == [], output
    assert {name: ops for name, ops in report["warnings"].items() if ops and name in FAIL_ON_WARNINGS} == {}, output
    assert report["complete"], output
    operations = report["operations"]
    # Every operation but the pass-through ones (9 of them) is tested.
    assert operations["tested"] == operations["selected"] == operations["total"] - 9, output
    assert operations["tested"] >= 20 and operations["errored"] == 0, output
