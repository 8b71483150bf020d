"""A real, throwaway PostgreSQL server for the store tests (Debian's `postgresql` package, started in a temp dir).

Its fixtures are registered for every test by `pytest_plugins = ["tests.serve.postgres"]` in tests/conftest.py::

    def test_something(postgres_server: PostgresServer) -> None:
        url = postgres_server.new_database()              # 'postgresql://postgres@127.0.0.1:PORT/test_3', empty

    def test_on_both(database_url: str) -> None:       # runs twice: sqlite:///tmp/.../store.db, then postgresql://...

Outside pytest: `with running_postgres() as server: ...`. The server listens on 127.0.0.1 only, on a free port,
trusts local connections, runs without fsync (tests need speed, not durability) and is stopped and deleted at the
end. PostgreSQL refuses to run as root, so as root it runs as the `postgres` OS user. Missing binaries fail the test
with what to install: the store must be tested against PostgreSQL, not skipped.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

INSTALL_HINT = "install Debian's PostgreSQL server (apt-get install postgresql), as .ci/run does"


class PostgresServer:
    """A started server: `admin_url` reaches its `postgres` database; `new_database()` makes an empty one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._numbers = itertools.count(1)

    def new_database(self) -> str:
        import psycopg

        name = f"test_{next(self._numbers)}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


def postgres_bin_dir() -> Path:
    """The newest installed server's bin folder; pytest.fail with the install hint when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.fail(f"no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; {INSTALL_HINT}", pytrace=False)
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a server in a fresh temp dir, yield it, then stop it and delete the dir."""
    bin_dir = postgres_bin_dir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="chatforge-pg-"))
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_postgres, *args], check=False, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{server_log}",
                        pytrace=False)

    started = False
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
            "--no-instructions")
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "30", "start")
        started = True
        yield PostgresServer(port)
    finally:
        if started:
            subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database for one test, once on a SQLite file and once on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_server").new_database()
