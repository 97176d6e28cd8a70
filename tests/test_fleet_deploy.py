"""The fleet's deployment files, checked without Docker: docker-compose-fleet.yml resolves with Debian's
docker-compose (offline) and wires the replicas to one database, one Redis and the two Ollama hosts;
deploy/nginx.conf passes Debian's `nginx -t`, and a real nginx run from it in front of two MiniVault
replicas on loopback streams tokens as they come, upgrades websockets, and keeps keys out of its logs.

nginx resolves `server minivault-1:8000` when it loads the file, and those names exist only on the
compose network. The test runs a copy in which exactly the two `server` lines and the `listen` line
are rewritten to loopback ports (asserted one substitution each), so every other line is the file's own;
the real file's directives are then read by a small parser. `resolver` with a variable in `proxy_pass`
would resolve at run time instead, but it bypasses the upstream block (least_conn, keepalive).
"""

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.sync.client import connect

from app.config import Settings
from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, free_port, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = "docker-compose-fleet.yml"
ENV_EXAMPLE = ROOT / ".env.fleet.example"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
SERVICES = {"nginx", "minivault-1", "minivault-2", "ollama-1", "ollama-2", "postgres", "redis"}
KEY = "fleet-test-key-7f3a"


def env_file_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def run_compose(*args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `apt-get install docker-compose` (make test does it as root)"
    # Variables from the shell override the env file; drop the fleet's, so the file alone decides.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIVAULT_", "OLLAMA_", "POSTGRES_", "NGINX_"))}
    command = [binary, "-f", COMPOSE_FILE, "--env-file", str(env_file), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    result = run_compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_fleet_compose_file_validates_with_the_example_env() -> None:
    result = run_compose("config", "-q")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr


def test_fleet_has_two_replicas_two_ollama_hosts_postgres_redis_and_nginx(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for replica in ("minivault-1", "minivault-2"):
        assert services[replica]["build"]["context"] == str(ROOT)
        assert services[replica]["stop_grace_period"] == "40s"
    assert services["ollama-1"]["volumes"] == ["ollama_1_data:/root/.ollama:rw"]
    assert services["ollama-2"]["volumes"] == ["ollama_2_data:/root/.ollama:rw"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["postgres"]["volumes"] == ["postgres_data:/var/lib/postgresql/data:rw"]
    assert services["redis"]["image"] == "redis:7"
    assert services["nginx"]["volumes"] == [f"{NGINX_CONF}:/etc/nginx/conf.d/default.conf:ro"]
    assert set(compose["volumes"]) == {"minivault_1_logs", "minivault_2_logs", "ollama_1_data", "ollama_2_data",
                                     "postgres_data"}  # fmt: skip


def test_every_fleet_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    tests = {name: service["healthcheck"]["test"] for name, service in compose["services"].items()}
    assert set(tests) == SERVICES
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    image_probe = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*\])", dockerfile).group(1))  # type: ignore[union-attr]
    assert tests["minivault-1"] == tests["minivault-2"] == ["CMD", *image_probe]
    assert "http://127.0.0.1:8000/health" in image_probe[-1]
    assert tests["ollama-1"] == tests["ollama-2"] == ["CMD", "ollama", "list"]
    assert tests["postgres"] == ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", "minivault", "-d", "minivault"]
    assert tests["redis"] == ["CMD", "redis-cli", "ping"]
    assert tests["nginx"] == ["CMD", "wget", "-q", "-O", "/dev/null", "-T", "4", "http://127.0.0.1/health"]


def test_only_nginx_publishes_a_port(compose: dict[str, Any]) -> None:
    published = {name: service["ports"] for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"nginx": ["127.0.0.1:8000:80/tcp"]}


def test_dependencies_wait_until_healthy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    healthy = {"condition": "service_healthy"}
    assert services["nginx"]["depends_on"] == {"minivault-1": healthy, "minivault-2": healthy}
    for replica in ("minivault-1", "minivault-2"):
        assert services[replica]["depends_on"] == {
            "postgres": healthy, "redis": healthy,
            "ollama-1": {"condition": "service_started"}, "ollama-2": {"condition": "service_started"},
        }  # fmt: skip


def test_both_replicas_get_the_same_database_redis_and_hosts(compose: dict[str, Any]) -> None:
    one, two = (compose["services"][name]["environment"] for name in ("minivault-1", "minivault-2"))
    assert one == two
    example = env_file_values(ENV_EXAMPLE)
    password = example["POSTGRES_PASSWORD"]
    assert one["MINIVAULT_DATABASE_URL"] == f"postgresql://minivault:{password}@postgres:5432/minivault"
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    assert one["MINIVAULT_REDIS_URL"] == "redis://redis:6379/0"
    assert one["OLLAMA_BASE_URLS"] == "http://ollama-1:11434,http://ollama-2:11434"
    assert compose["services"]["minivault-1"]["volumes"] != compose["services"]["minivault-2"]["volumes"]


def test_replica_environment_is_one_minivault_accepts(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith(("MINIVAULT_", "OLLAMA_", "OPENAI_")):
            monkeypatch.delenv(name)
    for name, value in compose["services"]["minivault-1"]["environment"].items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.ollama_urls() == ["http://ollama-1:11434", "http://ollama-2:11434"]
    assert settings.database_url is not None and settings.redis_url is not None
    assert settings.database_url.get_secret_value().startswith("postgresql://minivault:")
    assert (settings.max_concurrency, settings.rate_limit, settings.slot_lease_seconds) == (8, 60, 30.0)
    assert settings.api_keys is None  # empty in the example: auth off until keys are set
    assert (settings.auto_pull, settings.warmup, settings.max_body_bytes) == (True, True, 1_048_576)


def test_env_fleet_example_lists_what_the_compose_file_reads() -> None:
    read = set(re.findall(r"\$\{(\w+)", (ROOT / COMPOSE_FILE).read_text()))
    image_tags = {"NGINX_IMAGE_TAG", "OLLAMA_IMAGE_TAG"}  # defaults are fine; pinned by those who want to
    assert set(env_file_values(ENV_EXAMPLE)) == read - image_tags


def test_fleet_refuses_to_resolve_without_a_database_password(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose("config", "-q", env_file=empty)
    assert result.returncode == 1
    assert "set MINIVAULT_DATABASE_URL in .env.fleet" in result.stderr


# --- deploy/nginx.conf ---


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list["Directive"] = field(default_factory=list)

    def all(self, name: str) -> list["Directive"]:
        return [child for child in self.block if child.name == name]

    def one(self, name: str, *first_args: str) -> "Directive":
        [found] = [child for child in self.all(name) if child.args[: len(first_args)] == list(first_args)]
        return found


def parse_nginx(text: str) -> Directive:
    """nginx's grammar, enough for one file: directives end in `;`, blocks in `{ }`, `#` comments, quotes."""
    tokens = re.findall(r"#[^\n]*|'[^']*'|\"[^\"]*\"|[{};]|[^\s{};'\"]+", text)
    stack = [Directive("main", [])]
    words: list[str] = []
    for token in tokens:
        if token.startswith("#"):
            continue
        if token in (";", "{"):
            directive = Directive(words[0], words[1:])
            stack[-1].block.append(directive)
            if token == "{":
                stack.append(directive)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token[1:-1] if token[0] in "'\"" else token)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[unit]


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG])?", value).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit and unit.lower()]


@pytest.fixture(scope="module")
def conf() -> Directive:
    return parse_nginx(NGINX_CONF.read_text())


def test_nginx_balances_both_replicas_by_fewest_connections(conf: Directive) -> None:
    upstream = conf.one("upstream", "minivault")
    assert [d.name for d in upstream.block][0] == "least_conn"
    assert [d.args for d in upstream.all("server")] == [["minivault-1:8000"], ["minivault-2:8000"]]
    server = conf.one("server")
    assert [location.args for location in server.all("location")] == [["/"], ["@payload_too_large"], ["/ws/"]]
    for path in ("/", "/ws/"):
        assert server.one("location", path).one("proxy_pass").args == ["http://minivault"]


def test_nginx_keeps_streams_unbuffered_and_websockets_upgraded(conf: Directive) -> None:
    server = conf.one("server")
    assert server.one("proxy_http_version").args == ["1.1"]
    assert server.one("proxy_buffering").args == ["off"]
    assert server.one("proxy_request_buffering").args == ["off"]
    headers = {d.args[0]: d.args[1] for d in server.all("proxy_set_header")}
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Request-ID"] == "$minivault_request_id"
    upgrade = conf.one("map", "$http_upgrade", "$connection_upgrade")
    assert {d.name: d.args for d in upgrade.block} == {"default": ["upgrade"], "": [""]}
    request_id = conf.one("map", "$http_x_request_id", "$minivault_request_id")
    assert {d.name: d.args for d in request_id.block} == {"default": ["$http_x_request_id"], "": ["$request_id"]}
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(server.one(name).args[0]) >= 600, name
    # Locations that set any of these would drop the server's; they only proxy.
    for location in server.all("location"):
        assert not {d.name for d in location.block} & {"proxy_set_header", "proxy_buffering", "proxy_http_version"}


def test_nginx_body_limit_matches_minivault(conf: Directive, compose: dict[str, Any]) -> None:
    limit = size_bytes(conf.one("server").one("client_max_body_size").args[0])
    environment = compose["services"]["minivault-1"]["environment"]
    assert limit == int(environment["MINIVAULT_MAX_BODY_BYTES"]) == make_settings().max_body_bytes == 1_048_576
    answer = conf.one("server").one("location", "@payload_too_large").one("return").args
    assert answer[0] == "413"
    assert f"the limit is {limit} bytes" in answer[1]


def test_nginx_logs_leave_query_strings_out(conf: Directive) -> None:
    [log_format] = conf.all("log_format")
    assert log_format.args[0] == "minivault"
    line = "".join(log_format.args[1:])
    assert "$uri" in line
    for variable in ("$request ", '$request"', "$request_uri", "$args", "$query_string", "$arg_"):
        assert variable not in line, variable
    assert conf.one("server").one("access_log").args == ["/dev/stdout", "minivault"]
    assert conf.one("server").one("location", "/ws/").one("error_log").args == ["stderr", "crit"]


def nginx_binary() -> str:
    # Debian puts it in /usr/sbin, which an unprivileged user's PATH may lack.
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert binary, "nginx is missing: `apt-get install nginx` (make test does it as root)"
    return binary


TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def local_nginx(directory: Path, listen: int, replicas: list[int]) -> list[str]:
    """deploy/nginx.conf under a throwaway main config: loopback ports, every path in `directory`.

    One process (`master_process off`), so it runs the same as root or not, with no user switch.
    """
    text = NGINX_CONF.read_text()
    text, listens = re.subn(r"^    listen 80;$", f"    listen 127.0.0.1:{listen};", text, flags=re.MULTILINE)
    assert listens == 1
    for number, port in enumerate(replicas, 1):
        text, count = re.subn(rf"server minivault-{number}:8000;", f"server 127.0.0.1:{port};", text)
        assert count == 1
    (directory / "minivault.conf").write_text(text)
    temp_paths = "".join(f"{kind}_temp_path {directory / kind}; " for kind in TEMP_PATHS)
    error_log = directory / "error.log"
    main = directory / "main.conf"
    main.write_text(
        f"daemon off; master_process off; pid {directory / 'nginx.pid'}; error_log {error_log} notice;\n"
        f"events {{ worker_connections 256; }}\nhttp {{ {temp_paths}include {directory / 'minivault.conf'}; }}\n"
    )
    return [nginx_binary(), "-p", str(directory), "-e", str(error_log), "-c", str(main)]


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    command = local_nginx(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


# --- a real nginx from deploy/nginx.conf in front of two replicas ---


@dataclass
class ProxiedFleet:
    url: str
    fake: FakeOllama
    logs: list[Path]
    access_log: Path
    error_logs: list[Path]
    replicas: list[RunningServer]

    def replica_lines(self, total: int) -> list[list[dict[str, Any]]]:
        """Each replica's log lines, once `total` lines are written between them (within 10 s)."""
        deadline = time.monotonic() + 10
        while sum(len(read_log(log)) for log in self.logs) < total:
            assert time.monotonic() < deadline, f"the replicas logged {[len(read_log(p)) for p in self.logs]} lines"
            time.sleep(0.02)  # the lines are written when each exchange ends
        return [read_log(log) for log in self.logs]

    def final_lines(self) -> list[dict[str, Any]]:
        """Every line the replicas logged, read after stopping them (which flushes their logs)."""
        for replica in self.replicas:
            replica.stop()
        return [line for log in self.logs for line in read_log(log)]


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[ProxiedFleet]:
    fake = FakeOllama()
    logs = [tmp_path / f"replica-{n}" / "log.jsonl" for n in (1, 2)]
    with (
        serve_in_thread(fake, lifespan="off") as upstream,
        serve_in_thread(create_app(make_settings(ollama_base_url=upstream.url, log_path=logs[0], api_keys=KEY))) as one,
        serve_in_thread(create_app(make_settings(ollama_base_url=upstream.url, log_path=logs[1], api_keys=KEY))) as two,
    ):
        yield from _run_nginx(tmp_path, fake, logs, [one, two])


def _run_nginx(
    directory: Path, fake: FakeOllama, logs: list[Path], replicas: list[RunningServer]
) -> Iterator[ProxiedFleet]:
    listen = free_port()
    command = local_nginx(directory, listen, [replica.port for replica in replicas])
    fleet = ProxiedFleet(f"http://127.0.0.1:{listen}", fake, logs, directory / "access.log",
                  [directory / "error.log", directory / "stderr.log"], replicas)  # fmt: skip
    with fleet.access_log.open("wb") as stdout, fleet.error_logs[1].open("wb") as stderr:
        nginx = subprocess.Popen(command, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert nginx.poll() is None, fleet.error_logs[0].read_text()
            try:
                if httpx.get(f"{fleet.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "nginx did not answer within 15 s"
            time.sleep(0.02)
        yield fleet
    finally:
        nginx.terminate()
        nginx.wait(timeout=15)


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_sse_tokens_pass_through_nginx_as_they_are_written(proxied: ProxiedFleet) -> None:
    # `stall` sends two tokens, then nothing: they must come through on their own, not when the stream ends.
    body = {"prompt": "x", "model": "stall", "stream": True}
    data = []
    with (
        httpx.Client(timeout=5) as client,
        client.stream("POST", f"{proxied.url}/generate", json=body, headers=AUTH) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(json.loads(line[6:]))
            if len(data) == 2:
                break
    assert data == [{"content": "s0 "}, {"content": "s1 "}]
    # Hanging up on nginx reaches the replica, which closes its request to Ollama.
    deadline = time.monotonic() + 10
    while proxied.fake.disconnects != 1:
        assert time.monotonic() < deadline, "the upstream request stayed open after the client left"
        time.sleep(0.02)


def test_websocket_upgrades_through_nginx_and_its_key_stays_out_of_the_logs(proxied: ProxiedFleet) -> None:
    with connect(f"{proxied.url.replace('http', 'ws')}/ws/generate?api_key={KEY}") as ws:
        ws.send(json.dumps({"prompt": "through the proxy"}))
        frames = [json.loads(ws.recv(timeout=5))]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv(timeout=5)))
    assert frames[0]["type"] == "start"
    assert frames[-1]["type"] == "done"
    assert frames[-1]["response"] == "through the proxy"
    lines = proxied.replica_lines(1)
    assert [line["endpoint"] for replica in lines for line in replica] == ["ws"]

    deadline = time.monotonic() + 10
    while " /ws/generate " not in (access := proxied.access_log.read_text()):
        assert time.monotonic() < deadline, f"no access line for the websocket: {access!r}"
        time.sleep(0.02)  # nginx writes it when the connection closes
    assert '"GET /ws/generate HTTP/1.1" 101 ' in access
    for log in [proxied.access_log, *proxied.error_logs]:
        assert KEY not in log.read_text(), log.name


def test_request_id_is_the_clients_or_one_nginx_makes_and_shares(proxied: ProxiedFleet) -> None:
    body = {"prompt": "id please"}
    given = httpx.post(f"{proxied.url}/generate", json=body, headers={**AUTH, "X-Request-ID": "client-id-42"})
    made = httpx.post(f"{proxied.url}/generate", json=body, headers=AUTH)
    assert (given.status_code, made.status_code) == (200, 200)
    assert given.headers["x-request-id"] == given.json()["id"] == "client-id-42"
    nginx_id = made.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", nginx_id)
    logged = sorted(line["id"] for replica in proxied.replica_lines(2) for line in replica)
    assert logged == sorted(["client-id-42", nginx_id])
    access = proxied.access_log.read_text()
    assert "id=client-id-42\n" in access and f"id={nginx_id}\n" in access


def test_least_conn_sends_new_requests_to_the_replica_without_a_stream(proxied: ProxiedFleet) -> None:
    stalled = {"prompt": "x", "model": "stall", "stream": True}
    headers = {**AUTH, "X-Request-ID": "long-stream"}
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", f"{proxied.url}/generate", json=stalled, headers=headers) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # held, so the stream stays open until the block ends
            assert [next(lines), next(lines)] == ["event: token", 'data: {"content":"s0 "}']
            # Round-robin would alternate; least_conn sends all three to the replica that has no stream open.
            for n in range(3):
                quick = client.post(f"{proxied.url}/generate", json={"prompt": f"q{n}"}, headers=AUTH)
                assert quick.status_code == 200
    by_replica = [sorted((line["endpoint"], line["prompt"]) for line in log) for log in proxied.replica_lines(4)]
    assert sorted(by_replica, key=len) == [[("sse", "x")], [("rest", "q0"), ("rest", "q1"), ("rest", "q2")]]


def test_a_body_over_the_limit_stops_at_nginx_with_minivaults_error(proxied: ProxiedFleet) -> None:
    limit = 1_048_576
    as_json = {**AUTH, "Content-Type": "application/json"}
    too_large = httpx.post(f"{proxied.url}/generate", content=b"x" * (limit + 1), headers=as_json)
    at_limit = httpx.post(f"{proxied.url}/generate", content=b"x" * limit, headers=as_json)

    assert too_large.status_code == 413
    assert too_large.headers["content-type"] == "application/json"
    error = too_large.json()["error"]
    assert (error["code"], error["id"]) == ("payload_too_large", too_large.headers["x-request-id"])
    assert "1048576 bytes (MINIVAULT_MAX_BODY_BYTES)" in error["message"]
    # Exactly the limit passes nginx, and the replica answers it (not JSON: 422).
    assert at_limit.status_code == 422
    assert at_limit.json()["error"]["code"] == "invalid_request"
    # Only the second reached a replica (each logs the bodies it refuses).
    assert [(line["id"], line["error"]["code"]) for line in proxied.final_lines()] == [
        (at_limit.headers["x-request-id"], "invalid_request")
    ]
