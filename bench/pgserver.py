"""A throwaway PostgreSQL server for the benchmarks, started as the tests start theirs
(tests/postgres.py): ``initdb`` and ``pg_ctl`` from Debian's package, on a free loopback port,
as the ``postgres`` user when run as root, removed at the end.

Unlike the tests' server it keeps PostgreSQL's durability defaults (fsync, synchronous commit),
as a production server would, and loads ``pg_stat_statements`` to count statements.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_GLOB = "/usr/lib/postgresql/*/bin/initdb"
SERVER_USER = "postgres"
TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Activity:
    """What a database did: transactions (commits and rollbacks) and statements."""

    transactions: int
    statements: int

    def __sub__(self, other: Activity) -> Activity:
        return Activity(self.transactions - other.transactions, self.statements - other.statements)


@dataclass(frozen=True)
class Server:
    bin: Path
    root: Path
    port: int
    password: str
    run_as: tuple[str, ...]

    def url(self, database: str) -> str:
        """A URL without the password (the runners take it from PGPASSWORD)."""
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def sql(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg

        url = f"postgresql://{SERVER_USER}:{self.password}@127.0.0.1:{self.port}/{database}"
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def new_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def activity(self, database: str) -> Activity:
        """Counters of ``database`` so far, read from another database (whose own counters
        this reading moves)."""
        [(commits, rollbacks)] = self.sql(
            f"SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = '{database}'"
        )
        [(statements,)] = self.sql(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
            f"ON d.oid = s.dbid WHERE d.datname = '{database}'"
        )
        return Activity(int(str(commits)) + int(str(rollbacks)), int(str(statements)))

    def pg_ctl(self, *args: str) -> None:
        command = [*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=TIMEOUT_SECONDS)


@contextmanager
def throwaway_server() -> Iterator[Server]:
    found = sorted(glob.glob(SERVER_GLOB), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError(f"no PostgreSQL server ({SERVER_GLOB}): apt-get install postgresql")
    run_as: tuple[str, ...] = ()
    if os.geteuid() == 0:  # the server refuses to run as root
        pwd.getpwnam(SERVER_USER)
        run_as = ("runuser", "-u", SERVER_USER, "--")
    root = Path(tempfile.mkdtemp(prefix="bem-bench-pg-"))
    password = secrets.token_hex(16)
    server = Server(Path(found[-1]).parent, root, _free_port(), password, run_as)
    (root / "pwfile").write_text(password + "\n")
    if run_as:
        shutil.chown(root, SERVER_USER, SERVER_USER)
        shutil.chown(root / "pwfile", SERVER_USER, SERVER_USER)
    try:
        subprocess.run(
            [*run_as, str(server.bin / "initdb"), "-D", str(root / "data"), "-U", SERVER_USER,
             "--auth=scram-sha-256", f"--pwfile={root / 'pwfile'}", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, timeout=TIMEOUT_SECONDS,
        )  # fmt: skip
        options = (
            f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 "
            "-c shared_preload_libraries=pg_stat_statements"
        )
        server.pg_ctl("-l", str(root / "server.log"), "-o", options, "-w", "start")
        try:
            server.sql("CREATE EXTENSION pg_stat_statements")
            yield server
        finally:
            server.pg_ctl("-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
