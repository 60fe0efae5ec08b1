"""A store written before its unit was named a call (table ``groups``, state ``open``) is migrated
on open, from every older schema version, and reads back the same on both stores.

The rows are written with the old names, as an older bem-runner wrote them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from runner.names import from_raw
from runner.route import Destination
from runner.store.base import NewFile, Store
from runner.store.named_sql import load_queries, statements
from runner.store.postgres import open_postgres_store
from runner.store.sqlite import open_sqlite_store
from tests.conftest import run_sql

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

RENAMING = "ALTER TABLE groups RENAME TO calls"


def _migrations(filename: str) -> dict[int, str]:
    """Each ``schema_N`` script of a store's statements, by N."""
    return {
        int(name.removeprefix("schema_")): sql
        for name, sql in load_queries(filename).items()
        if name.removeprefix("schema_").isdigit()
    }


def _renaming_version(migrations: dict[int, str]) -> int:
    (version,) = [v for v, sql in migrations.items() if RENAMING in sql]
    return version


SQLITE_MIGRATIONS = _migrations("queries.sql")
POSTGRES_MIGRATIONS = _migrations("postgres_queries.sql")
SQLITE_RENAMING = _renaming_version(SQLITE_MIGRATIONS)
POSTGRES_RENAMING = _renaming_version(POSTGRES_MIGRATIONS)

FOLDER_KEY = b"wf/caf\xe9 box"
"""A batch key that is not UTF-8: kept as its exact bytes through the migration."""

# Written in the old names: a folder batch still taking files (two of them), a file-mode call
# bem is working on (one file), and a rejected file that belongs to no call.
OLD_ROWS = [
    "INSERT INTO groups (id, call_reference_id, workflow, mode, group_key, state, opened_at,"
    " last_added_at, file_count, byte_count) VALUES"
    " (1, 'bemr-folder', 'wf', 'folder', {key}, 'open', 1.0, 2.0, 2, 30),"
    " (2, 'bemr-single', 'wf', 'file', {single}, 'open', 1.0, 1.0, 0, 0)",
    "UPDATE groups SET state = 'polling', call_id = 'call-2', status = 'running',"
    " submitted_at = 3.0, not_before = 50.0, file_count = 1, byte_count = 5 WHERE id = 2",
    "INSERT INTO files (id, rel, size, mtime_ns, workflow, item_reference_id, group_id, state,"
    " seen_at) VALUES"
    " (1, {a}, 10, 1, 'wf', 'item-a', 1, 'queued', 1.0),"
    " (2, {b}, 20, 1, 'wf', 'item-b', 1, 'queued', 2.0),"
    " (3, {single}, 5, 1, 'wf', NULL, 2, 'queued', 1.0)",
    "INSERT INTO files (id, rel, size, mtime_ns, state, reason, seen_at)"
    " VALUES (4, {rejected}, 1, 1, 'rejected', 'unreadable', 1.0)",
]


def _old_rows(literal: Callable[[bytes], str]) -> list[str]:
    names = {
        "key": FOLDER_KEY,
        "a": FOLDER_KEY + b"/a.txt",
        "b": FOLDER_KEY + b"/b.txt",
        "single": b"wf/single.txt",
        "rejected": b"wf/bad.txt",
    }
    shown = {name: literal(value) for name, value in names.items()}
    return [row.format(**shown) for row in OLD_ROWS]


def _new_file(rel: bytes) -> NewFile:
    name = from_raw(rel)
    destination = Destination("wf", "folder", from_raw(FOLDER_KEY), name.rsplit("/", 1)[-1])
    return NewFile(name, 7, 1, None, "text", destination)


async def _reads_back(store: Store) -> None:
    """What the old rows say, read through today's names; the collecting batch still fills."""
    (collecting,) = await store.collecting_calls()
    assert (collecting.id, collecting.state, collecting.batch_key) == (
        1,
        "collecting",
        from_raw(FOLDER_KEY),
    )
    assert (collecting.file_count, collecting.byte_count) == (2, 30)
    polling = await store.call(2)
    assert (polling.state, polling.call_id, polling.status) == ("polling", "call-2", "running")
    files = await store.files_of_calls([1, 2])
    assert [(f.id, f.call_row_id) for f in files[1]] == [(1, 1), (2, 1)]
    assert [(f.id, f.call_row_id) for f in files[2]] == [(3, 2)]
    (rejected,) = await store.rejected_files(limit=10)
    assert (rejected.id, rejected.call_row_id) == (4, None)
    counts = await store.counts()
    assert counts.calls == {"collecting": 1, "polling": 1}
    assert await store.open_call_count() == 1
    # a new file of the same folder joins the batch that was open before the migration
    await store.add_files([_new_file(FOLDER_KEY + b"/c.txt")], now=5.0, batch_limits={})
    (still,) = await store.collecting_calls()
    assert (still.id, still.file_count) == (1, 3)
    await store.close_batch(1)
    assert await store.collecting_calls() == []
    assert [c.id for c in await store.ready_calls(now=5.0, limit=10)] == [1]


@pytest.mark.parametrize("version", range(1, SQLITE_RENAMING))
async def test_an_older_sqlite_state_is_migrated_and_reads_back(
    tmp_path: Path, version: int
) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    for step in range(1, version + 1):
        db.executescript(SQLITE_MIGRATIONS[step])
    for statement in _old_rows(lambda raw: f"x'{raw.hex()}'"):
        db.execute(statement)
    db.commit()
    db.close()

    async with open_sqlite_store(path) as store:
        await _reads_back(store)
        assert await store.integrity_check() == "ok"

    db = sqlite3.connect(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
    assert "calls" in tables
    assert "groups" not in tables
    assert not {name for name in indexes if "group" in name}


@pytest.mark.parametrize("version", range(1, POSTGRES_RENAMING))
async def test_an_older_postgresql_store_is_migrated_and_reads_back(
    postgres_url: str, version: int
) -> None:
    script = [s for step in range(1, version + 1) for s in statements(POSTGRES_MIGRATIONS[step])]
    script.append(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'")
    for statement in script + _old_rows(lambda raw: f"'\\x{raw.hex()}'::bytea"):
        run_sql(postgres_url, statement)
    run_sql(postgres_url, "SELECT setval(pg_get_serial_sequence('groups', 'id'), 2)")
    run_sql(postgres_url, "SELECT setval(pg_get_serial_sequence('files', 'id'), 4)")

    async with open_postgres_store(postgres_url) as store:
        await _reads_back(store)

    names = run_sql(
        postgres_url,
        "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
        " UNION ALL SELECT conname FROM pg_constraint"
        " WHERE connamespace = current_schema()::regnamespace",
    )
    assert ("calls",) in names
    assert [name for (name,) in names if "group" in str(name)] == []
