"""Real servers for tests: redis-server and PostgreSQL, started by the tests themselves.

``scripts/test-deps`` (run by ``make test``) installs the Debian packages; these helpers
start the servers on first use (session-scoped fixtures in ``tests/conftest.py``) and stop
them at the end. A test that needs one FAILS when it cannot start: a missing component is
a broken test setup, not a reason to skip.

* redis-server: a private instance on a free port, no persistence, stopped with
  ``redis-cli -p PORT shutdown nosave``.
* Chromium: Debian's ``/usr/bin/chromium`` driven by playwright, which never downloads a
  browser of its own here; the flags keep it from reaching for the network.
* PostgreSQL: the Debian cluster (``pg_ctlcluster VERSION main start``), a ``netstack``
  role and a ``netstack_test`` database; each test gets its own schema (dropped after), so
  tests and parallel runs do not see each other's tables. The cluster is stopped at the
  end only if these helpers started it AND no other test run still uses it: every run holds
  a shared ``flock`` on :data:`PG_USERS_LOCK` while it uses the cluster, and the stopper
  needs the lock exclusively (two suites in two checkouts at once used to see "the
  database system is shutting down" when the first to finish stopped the cluster).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

from tests.helpers import TIMEOUT, free_port, poll_until

if TYPE_CHECKING:
    from playwright.async_api import Browser

PG_USER = "netstack"
PG_PASSWORD = "netstack"
PG_DATABASE = "netstack_test"
PG_PORT = 5432
PG_URL = f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{PG_PORT}/{PG_DATABASE}"


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def _need(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        pytest.fail(f"{cmd} is not installed: run `make test` (scripts/test-deps installs it)")
    return path


# ---------------------------------------------------------------- redis


@dataclass(frozen=True)
class RedisServer:
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        return _run(["redis-cli", "-p", str(self.port), *args]).stdout.strip()


@contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A private redis-server on a free (or the given) loopback port, for the block."""
    _need("redis-server")
    _need("redis-cli")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    started = _run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--dir",
            str(workdir),
            "--pidfile",
            str(workdir / "redis.pid"),
            "--logfile",
            str(workdir / "redis.log"),
        ],
        check=False,
    )
    if started.returncode != 0:
        pytest.fail(f"redis-server did not start: {started.stderr or started.stdout}")
    server = RedisServer(port)

    def answers() -> bool:
        return _run(["redis-cli", "-p", str(port), "ping"], check=False).stdout.strip() == "PONG"

    try:
        poll_until(answers, timeout=TIMEOUT * 2)
    except AssertionError:
        log = (workdir / "redis.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"redis-server on port {port} does not answer; its log:\n{log}")
    try:
        yield server
    finally:
        _run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False)


# ---------------------------------------------------------------- PostgreSQL


def _pg_version() -> str:
    versions = sorted(
        (p.name for p in Path("/usr/lib/postgresql").glob("*") if (p / "bin/postgres").exists()),
        key=int,
    )
    if not versions:
        pytest.fail("PostgreSQL is not installed: run `make test` (scripts/test-deps)")
    return versions[-1]


def _as_postgres(sql: str) -> str:
    """Run one SQL statement with psql as the ``postgres`` superuser (local socket)."""
    argv = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-tAc", sql]
    if os.geteuid() == 0:
        argv = ["su", "postgres", "-c", " ".join(quote_shell(a) for a in argv)]
    else:
        argv = ["sudo", "-u", "postgres", *argv]
    done = _run(argv, check=False)
    if done.returncode != 0:
        pytest.fail(f"psql failed ({sql}): {done.stderr.strip()}")
    return done.stdout.strip()


def quote_shell(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _cluster_running(version: str) -> bool:
    return _run(["pg_ctlcluster", version, "main", "status"], check=False).returncode == 0


PG_USERS_LOCK = Path("/tmp/netstack-tests-postgres.lock")


@contextmanager
def postgres_server() -> Iterator[str]:
    """The Debian PostgreSQL cluster, running, with the test role and database; yields a URL."""
    _need("pg_ctlcluster")
    version = _pg_version()
    with PG_USERS_LOCK.open("a") as users:
        # Shared while in use; waits while another run holds it exclusively to stop it.
        fcntl.flock(users, fcntl.LOCK_SH)
        with _postgres_cluster(version, users.fileno()) as url:
            yield url


@contextmanager
def _postgres_cluster(version: str, users: int) -> Iterator[str]:
    clusters = _run(["pg_lsclusters", "-h"], check=False).stdout
    if not re.search(rf"^{version}\s+main\s", clusters, re.M):
        created = _run(["pg_createcluster", version, "main"], check=False)
        if created.returncode != 0:
            pytest.fail(f"pg_createcluster {version} main failed: {created.stderr.strip()}")
    started_here = False
    if not _cluster_running(version):
        done = _run(["pg_ctlcluster", version, "main", "start"], check=False)
        # Another test run may have started it in between: only "still down" is a failure.
        if done.returncode != 0 and not _cluster_running(version):
            pytest.fail(f"pg_ctlcluster {version} main start failed: {done.stderr.strip()}")
        started_here = done.returncode == 0
    try:
        _as_postgres(
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'netstack') THEN "
            f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'; END IF; END$$"
        )
        exists = _as_postgres(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'")
        if exists != "1":
            _as_postgres(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}")
        # Tests need no durability across a power cut: commits without waiting for fsync.
        _as_postgres(f"ALTER DATABASE {PG_DATABASE} SET synchronous_commit = off")
        yield PG_URL
    finally:
        if started_here and _sole_user(users):
            _run(["pg_ctlcluster", version, "main", "stop", "-m", "fast"], check=False)


def _sole_user(users: int) -> bool:
    """Convert our shared lock to exclusive: possible only if no other run holds it."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh schema in the test database; yields a URL whose search_path is that schema."""
    import psycopg
    from psycopg import sql

    schema = f"t_{uuid.uuid4().hex[:16]}"
    name = sql.Identifier(schema)
    with psycopg.connect(base_url, autocommit=True, connect_timeout=int(TIMEOUT)) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
    try:
        yield f"{base_url}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(base_url, autocommit=True, connect_timeout=int(TIMEOUT)) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(name))


# ---------------------------------------------------------------- Chromium

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Debian Chromium through playwright (fails if it is not installed)."""
    from playwright.async_api import async_playwright

    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - one stat, before the browser starts
        pytest.fail(f"{CHROMIUM} is not installed: run `make test` (scripts/test-deps)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=TIMEOUT * 4000
        )
        try:
            yield browser
        finally:
            await browser.close()
