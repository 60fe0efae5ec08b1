"""A throwaway PostgreSQL cluster for the tests: ``initdb`` and ``pg_ctl`` from Debian's package.

The session-scoped fixture :func:`postgres_cluster` starts one cluster on a free loopback port,
its socket and data in a temporary folder (owned by ``postgres`` and run as that user when the
tests run as root, since the server refuses to run as root), and removes it all at the end.
Each test takes a schema of its own (:func:`postgres_url`; a store lives in the schema its
URL's ``search_path`` names). Where no server binaries
can be found the fixture skips, saying why; CI installs them (``.ci/run``).

Load it with ``pytest_plugins = ["tests.postgres"]``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .conftest import free_port

if TYPE_CHECKING:
    from runner.store.postgres import PostgresStore

SERVER_GLOB = "/usr/lib/postgresql/*/bin/initdb"
SERVER_USER = "postgres"
START_TIMEOUT_SECONDS = 60
FAST_BUT_UNSAFE = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)
"""Durability is not under test here: a cluster that lives for one test session need not sync."""


def server_bin() -> Path | None:
    """The newest installed server's ``bin`` folder, if any."""
    found = sorted(glob.glob(SERVER_GLOB), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@dataclass
class Cluster:
    bin: Path
    root: Path
    port: int
    password: str
    run_as: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(
        self, database: str = "postgres", *, schema: str | None = None, password: bool = True
    ) -> str:
        """A URL to ``database``; with ``schema``, one whose search path is that schema."""
        secret = f":{self.password}" if password else ""
        options = f"?options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://{SERVER_USER}{secret}@127.0.0.1:{self.port}/{database}{options}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    @property
    def version(self) -> int:
        return int(self.bin.parts[-2])

    def new_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        # a file copy of the tiny template is ~5x faster than logging it block by block
        strategy = " STRATEGY FILE_COPY" if self.version >= 15 else ""
        self.admin(f'CREATE DATABASE "{name}"{strategy}')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def new_schema(self) -> str:
        """An empty schema in the ``postgres`` database: ten times quicker than a database."""
        name = f"t_{secrets.token_hex(6)}"
        self.admin(f'CREATE SCHEMA "{name}"')
        return name

    def drop_schema(self, name: str) -> None:
        self.admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def pg_ctl(self, *args: str) -> None:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run([*self.run_as, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 {FAST_BUT_UNSAFE}"
        self.pg_ctl(
            "-l", str(self.root / "server.log"), "-o", options, "-w",
            "-t", str(START_TIMEOUT_SECONDS), "start",
        )  # fmt: skip

    def restart(self) -> None:
        # the log again: else the new server writes to our pipes and pg_ctl never returns
        self.pg_ctl("-l", str(self.root / "server.log"), "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "-w", "stop")


def _run_as() -> list[str] | None:
    """How to run the server's tools: as ourselves, or as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return None
    runuser = shutil.which("runuser")
    return [runuser, "-u", SERVER_USER, "--"] if runuser else None


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    bindir = server_bin()
    if bindir is None:
        pytest.skip(
            f"no PostgreSQL server binaries ({SERVER_GLOB}); install Debian's postgresql package"
        )
    run_as = _run_as()
    if run_as is None:
        pytest.skip(f"running as root, but there is no {SERVER_USER!r} user or no runuser")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'bem-runner[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="bem-pg-"))
    if run_as:
        shutil.chown(root, SERVER_USER, SERVER_USER)
    password = secrets.token_hex(16)
    cluster = Cluster(bindir, root, free_port(), password, run_as)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as:
        shutil.chown(pwfile, SERVER_USER, SERVER_USER)
    try:
        subprocess.run(
            [
                *run_as, str(bindir / "initdb"), "-D", str(cluster.data), "-U", SERVER_USER,
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        cluster.start()
    except subprocess.CalledProcessError as exc:
        log = root / "server.log"
        detail = log.read_text(errors="replace") if log.exists() else exc.stderr.decode()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start a throwaway PostgreSQL: {exc}\n{detail}")
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_schema(postgres_cluster: Cluster) -> Iterator[str]:
    """An empty schema of the test's own, dropped after it."""
    name = postgres_cluster.new_schema()
    yield name
    postgres_cluster.drop_schema(name)


@pytest.fixture
def postgres_url(postgres_cluster: Cluster, postgres_schema: str) -> str:
    """A URL (password included) to an empty store of the test's own."""
    return postgres_cluster.url(schema=postgres_schema)


@pytest.fixture
async def runners(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two runners, ``a`` and ``b``, sharing one store."""
    from runner.store.postgres import open_postgres_store

    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_postgres_store(postgres_url, runner_id="a"))
        b = await stack.enter_async_context(open_postgres_store(postgres_url, runner_id="b"))
        yield a, b

