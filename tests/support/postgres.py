"""A real PostgreSQL for the tests: Debian's server, started once per test run as an unprivileged user in a
temporary directory on a free loopback port, and a fresh database for each test.

tests/conftest.py loads these fixtures with `pytest_plugins`: a plugin is loaded once per
run, whichever modules name it, so they all share the one server.
"""

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support.servers import free_port

# Debian installs each major version side by side; the newest one present is used.
PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
OWNER = "minivault"  # what MiniVault connects as: owns its database, and is no superuser
_STARTS = 3  # tries, each on another free port (one may be taken between choosing it and binding it)


@dataclass(frozen=True)
class PostgresServer:
    port: int
    root: Path
    owner: str = OWNER

    def url(self, database: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.owner}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        """A superuser connection to the maintenance database (autocommit: CREATE DATABASE needs it)."""
        return psycopg.connect(self.url(user=SUPERUSER), autocommit=True)


def _bin_dir() -> Path:
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "pg_ctl").exists()), key=lambda p: int(p.parent.name))
    if not versions:
        raise RuntimeError(
            f"no PostgreSQL server under {PG_ROOT}; install Debian's `postgresql` (make system-deps does, as root)"
        )
    return versions[-1]


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user the package creates."""
    return ["runuser", "-u", SUPERUSER, "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], timeout: float = 60) -> None:
    done = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def start_postgres() -> PostgresServer:
    """initdb in a new temporary directory, then pg_ctl start on a free port; `stop_postgres` undoes both."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="minivault-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, SUPERUSER, SUPERUSER)
    data = root / "data"
    try:
        # Trust on loopback only (the server listens nowhere else); C.UTF-8 is in every glibc.
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
              "--locale=C.UTF-8", "--no-sync"])  # fmt: skip
        for attempt in range(_STARTS):
            port = free_port()
            # Durability is not under test: without fsync, CREATE DATABASE and commits cost far less.
            options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c max_connections=200")  # fmt: skip
            try:
                _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                      "-o", options, "start"], timeout=90)  # fmt: skip
                break
            except RuntimeError:
                if attempt == _STARTS - 1:
                    raise RuntimeError((root / "server.log").read_text(errors="replace")[-4000:]) from None
        server = PostgresServer(port, root)
        with server.admin() as admin:
            admin.execute(f"CREATE ROLE {OWNER} LOGIN")
        return server
    except BaseException:
        _stop(bin_dir, data)
        shutil.rmtree(root, ignore_errors=True)
        raise


def stop_postgres(server: PostgresServer) -> None:
    _stop(_bin_dir(), server.root / "data")
    shutil.rmtree(server.root, ignore_errors=True)


def _stop(bin_dir: Path, data: Path) -> None:
    if (data / "postmaster.pid").exists():
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], timeout=90)


_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The run's one server, started at first use and stopped at the end of the run."""
    server = start_postgres()
    yield server
    stop_postgres(server)


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty database owned by MiniVault's unprivileged role, dropped after the test."""
    name = f"test_{os.getpid()}_{next(_names)}"
    with postgres.admin() as admin:
        admin.execute(f"CREATE DATABASE {name} OWNER {postgres.owner} TEMPLATE template0 STRATEGY file_copy")
    yield postgres.url(name)
    with postgres.admin() as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
