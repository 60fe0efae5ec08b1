"""``bem-runner status`` lists the runners sharing a store, in its table and in ``--json``."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.route import Destination
from runner.store.base import NewFile
from runner.store.sqlite import open_sqlite_store
from tests.conftest import run_sql

if TYPE_CHECKING:
    from runner.store.postgres import PostgresStore
    from tests.postgres import Cluster

pytest_plugins = ["tests.postgres"]


def status(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["status", *args], catch_exceptions=False)
    return result.exit_code, result.output


def paths(root: Path) -> list[str]:
    return [f"--{name}={root / name}" for name in ("inbox", "outbox", "archive")] + [
        f"--state={root / 'state.db'}"
    ]


@pytest.mark.anyio
async def test_status_lists_each_runner_with_its_heartbeat_and_the_calls_it_holds(
    tmp_path: Path,
    postgres_cluster: Cluster,
    postgres_schema: str,
    postgres_url: str,
    runners: tuple[PostgresStore, PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, _ = runners
    new = [
        NewFile(f"wf/{n}.txt", 1, 1, None, "text", Destination("wf", "file", f"wf/{n}.txt", "x"))
        for n in range(3)
    ]
    await a.add_files(new, now=1.0, batch_limits={})
    held = await a.claim_ready(now=1.0, limit=2)
    await a.mark_sending([g.id for g in held], now=2.0)
    run_sql(
        postgres_url,
        "UPDATE runners SET heartbeat_at = now() - interval '42 seconds' WHERE id = 'b'",
    )
    monkeypatch.setenv("PGPASSWORD", postgres_cluster.password)
    url = postgres_cluster.url(schema=postgres_schema, password=False)

    code, output = await anyio.to_thread.run_sync(
        status, "--json", "--store", url, *paths(tmp_path)
    )
    assert code == 0, output
    listed = json.loads(output)["runners"]
    assert [(r["id"], r["host"], r["calls_held"]) for r in listed] == [
        ("a", socket.gethostname(), 2),
        ("b", socket.gethostname(), 0),
    ]
    ages = {r["id"]: r["heartbeat_age_seconds"] for r in listed}
    assert ages["b"] >= 42 > ages["a"]
    assert all(r["heartbeat_at"].endswith("+00:00") for r in listed)

    code, output = await anyio.to_thread.run_sync(status, "--store", url, *paths(tmp_path))
    assert code == 0, output
    table = output[output.index("runners") :].splitlines()
    rows = {line.split()[0]: line.split() for line in table}
    assert rows["a"][1] == rows["b"][1] == socket.gethostname()
    assert rows["a"][-1] == "2"  # calls held
    assert rows["b"][-1] == "0"
    assert rows["b"][-3:-1] == ["s", "ago)"]


def test_status_on_a_sqlite_state_lists_no_runner(tmp_path: Path) -> None:
    async def create() -> None:
        async with open_sqlite_store(tmp_path / "state.db"):
            pass

    anyio.run(create)
    code, output = status("--json", *paths(tmp_path))
    assert code == 0, output
    assert json.loads(output)["runners"] == []
    code, output = status(*paths(tmp_path))
    assert code == 0, output
    assert "runners: none has joined this store" in output
