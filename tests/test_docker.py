"""What can be checked of the Docker setup without a Docker engine: the compose files resolve
(Debian's docker-compose, offline), the Dockerfile's CMD and HEALTHCHECK really start and probe
the app in this Python, and the README's Docker steps name what the files define."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.servers import RunningServer, bound_socket

ROOT = Path(__file__).resolve().parent.parent


def compose_config(*args: str) -> dict:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `apt-get install docker-compose` (make test does it as root)"
    result = subprocess.run([binary, *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OLLAMA_MODEL": "qwen2:0.5b"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_ollama_compose_file_resolves() -> None:
    config = compose_config("-f", "docker-compose.yml", "--profile", "pull")
    ollama = config["services"]["ollama"]

    assert ollama["image"].startswith("ollama/ollama:")
    assert ollama["container_name"] == "ollama"
    assert "127.0.0.1:11434:11434/tcp" in ollama["ports"]
    assert "ollama_data:/root/.ollama:rw" in ollama["volumes"]
    assert ollama["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    assert ollama["restart"] == "unless-stopped"
    assert config["volumes"]["ollama_data"]["name"] == "ollama_data"
    pull = config["services"]["ollama-pull"]
    assert pull["profiles"] == ["pull"]
    assert pull["depends_on"] == {"ollama": {"condition": "service_healthy"}}
    assert pull["entrypoint"] == ["ollama", "pull", "qwen2:0.5b"]
    assert pull["environment"]["OLLAMA_HOST"] == "http://ollama:11434"
    assert config["networks"]["minivault"]["name"] == "minivault"


def test_default_compose_up_starts_only_ollama() -> None:
    # Services without a profile start on a plain `up`; ollama-pull waits for `--profile pull`.
    services = compose_config("-f", "docker-compose.yml")["services"]
    assert [name for name, service in services.items() if not service.get("profiles")] == ["ollama"]


def test_app_compose_file_resolves_onto_the_ollama_network() -> None:
    config = compose_config("-f", "docker-compose-app.yml")
    app = config["services"]["minivault"]

    assert app["build"]["context"] == str(ROOT)
    assert app["environment"]["OLLAMA_BASE_URL"] == "http://ollama:11434"
    assert app["environment"]["MINIVAULT_BACKEND"] == "ollama"
    assert app["environment"]["OLLAMA_MODEL"] == "qwen2:0.5b"
    assert app["environment"]["MINIVAULT_WARMUP"] == "true"
    assert app["environment"]["MINIVAULT_AUTO_PULL"] == "true"  # no manual `ollama pull` step
    assert app["stop_grace_period"] == "40s"  # longer than MINIVAULT_SHUTDOWN_GRACE's default
    assert app["ports"] == ["127.0.0.1:8000:8000/tcp"]
    assert f"{ROOT / 'logs'}:/app/logs:rw" in app["volumes"]
    network = config["networks"]["minivault"]
    assert network["external"] is True
    ollama_network = compose_config("-f", "docker-compose.yml")["networks"]["minivault"]["name"]
    assert network["name"] == ollama_network


def test_dockerfile_layers_user_and_ports() -> None:
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]

    assert re.fullmatch(r"python:3\.1[1-9]-slim", steps[0][1])
    copies = [args for kind, args in steps if kind == "COPY"]
    assert copies.index("requirements.txt ./") < copies.index("app ./app"), "dependencies must be a cached layer"
    assert kinds.index("RUN") < [i for i, (k, a) in enumerate(steps) if k == "COPY" and a == "app ./app"][0]
    assert [args for kind, args in steps if kind == "USER"] == ["minivault"]
    assert [args for kind, args in steps if kind == "EXPOSE"] == ["8000"]
    assert '"/app/logs"' in dict(steps)["VOLUME"]
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", ".git/", "logs/", "*.gguf"} <= set(dockerignore)


def _exec_form(kind: str) -> list[str]:
    args = dict(dockerfile_instructions())[kind]
    if kind == "HEALTHCHECK":
        args = args[args.index("CMD") + 3 :]
    return json.loads(args)


def test_image_cmd_starts_the_app_and_healthcheck_probes_it(fake_server: RunningServer, tmp_path: Path) -> None:
    cmd = _exec_form("CMD")
    assert cmd[:2] == ["uvicorn", "app.main:app"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--http") + 1] == "app.web.connections:GuardedProtocol"  # the connection guards
    # Same command, but bound to loopback on a free port handed over as a file descriptor.
    sock = bound_socket()
    port = sock.getsockname()[1]
    flags = cmd[2:]
    for option in ("--host", "--port"):
        del flags[flags.index(option) : flags.index(option) + 2]
    command = [str(Path(sys.executable).parent / "uvicorn"), "app.main:app", *flags, "--fd", str(sock.fileno())]
    env = {**os.environ, "MINIVAULT_BACKEND": "ollama", "OLLAMA_BASE_URL": fake_server.url,
           "MINIVAULT_LOG_PATH": str(tmp_path / "log.jsonl")}  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env=env, pass_fds=[sock.fileno()], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        started = []
        for line in server.stderr:
            started.append(line)
            if "Application startup complete" in line:
                break
        else:
            pytest.fail("the image's CMD did not start the app")
        assert any("connection guards on" in line for line in started), started
        probe = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in _exec_form("HEALTHCHECK")]
        assert probe[0] == "python"
        healthy = subprocess.run([sys.executable, *probe[1:]], timeout=30)
        assert healthy.returncode == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()  # type: ignore[union-attr]
        sock.close()
    unhealthy = subprocess.run([sys.executable, *probe[1:]], capture_output=True, timeout=30)
    assert unhealthy.returncode != 0


def test_readme_docker_steps_name_what_the_files_define() -> None:
    readme = (ROOT / "README.md").read_text()
    for step in (
        "docker compose up -d",
        "docker compose --profile pull up",
        "docker exec -it ollama ollama pull",
        "docker compose -f docker-compose-app.yml up --build",
    ):
        assert step in readme, step
    assert "`ollama-pull`" in readme and "`ollama_data`" in readme and "`minivault`" in readme
