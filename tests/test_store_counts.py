"""The supervisor counts the store at every turn: on SQLite each count reads an index that holds
what it counts, never every row (a call's row carries its whole result), on a fresh state and on
one migrated from the schema before those indexes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from runner.store.named_sql import load_queries
from runner.store.sqlite import SCHEMA_VERSION, open_sqlite_store

pytestmark = pytest.mark.anyio

QUERIES = load_queries("queries.sql")
COUNTS = ("count_files", "count_calls", "count_reused", "open_call_count")
INDEXES_OF_COUNTS = 6


def _reads_indexes_only(plan: list[str]) -> bool:
    """Every table step searches by an index or scans one that covers the query."""
    steps = [step for step in plan if step.startswith(("SCAN", "SEARCH"))]
    return bool(steps) and all(
        step.startswith("SEARCH") or "COVERING INDEX" in step for step in steps
    )


async def test_every_count_reads_an_index_on_a_new_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with open_sqlite_store(path):
        pass
    db = sqlite3.connect(path)
    try:
        plans = _plans_of(db)
    finally:
        db.close()
    assert {name: _reads_indexes_only(plan) for name, plan in plans.items()} == dict.fromkeys(
        COUNTS, True
    ), plans


async def test_a_state_from_before_the_count_indexes_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    for version in range(1, INDEXES_OF_COUNTS):
        db.executescript(QUERIES[f"schema_{version}"])
    db.commit()
    assert not all(_reads_indexes_only(plan) for plan in _plans_of(db).values())
    db.close()

    async with open_sqlite_store(path) as store:
        assert await store.integrity_check() == "ok"
    db = sqlite3.connect(path)
    try:
        [(version,)] = db.execute(QUERIES["schema_version"]).fetchall()
        assert int(version) == SCHEMA_VERSION
        assert all(_reads_indexes_only(plan) for plan in _plans_of(db).values())
    finally:
        db.close()


def _plans_of(db: sqlite3.Connection) -> dict[str, list[str]]:
    return {
        name: [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + QUERIES[name])]
        for name in COUNTS
    }
