"""``bem-runner store migrate``: a SQLite state made by a real run, copied into PostgreSQL, and
finished there without sending anything twice; and every refusal, which leaves the target empty."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec.structs
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import cli
from runner.credentials import Secret
from runner.emulator import Emulator, EmulatorSettings
from runner.names import shown
from runner.route import Destination
from runner.store.base import NewFile, WebhookEvent
from runner.store.lock import state_owner
from runner.store.sqlite import open_sqlite_store
from tests.conftest import run_sql
from tests.pipeline import drain, make_config, outbox_documents, running, write_files

if TYPE_CHECKING:
    from tests.postgres import Cluster

pytest_plugins = ["tests.postgres"]

LATENCY = 5.0
"""Emulator seconds each call takes; its time moves only when the test moves it (run phase)."""
MAX_OPEN_CALLS = 3
ODD_NAMES = [
    os.fsdecode(b"wf/caf\xe9-latin1.txt"),  # not UTF-8
    "wf/new\nline.txt",
    "wf/ünïcödé ☃.txt",
    "wf/-leading dash.txt",
    "wf/back\\slash.txt",
]
"""Names the file system allows that a text column would mangle."""
FIRST = [("wf/alpha.txt", b"alpha"), ("wf/beta.txt", b"beta")]
SECOND = [(name, f"content of {name!r}".encode(errors="surrogateescape")) for name in ODD_NAMES]
SECOND += [("wf/alpha-again.txt", b"alpha")]  # content dedupe: reuses alpha's result, no call


def state_rows(path: Path) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """(calls as (id, reference, bem call id, state), files as (id, name bytes, call, state))."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        calls = db.execute("SELECT id, call_reference_id, call_id, state FROM calls").fetchall()
        files = db.execute("SELECT id, rel, call_row_id, state FROM files").fetchall()
    return set(calls), {(i, bytes(rel), g, s) for i, rel, g, s in files}


def store_rows(url: str) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    calls = run_sql(url, "SELECT id, call_reference_id, call_id, state FROM calls")
    files = run_sql(url, "SELECT id, rel, call_row_id, state FROM files")
    return set(calls), {(i, bytes(rel), g, s) for i, rel, g, s in files}  # type: ignore[call-overload]


def row_counts(url: str) -> tuple[int, ...]:
    [row] = run_sql(
        url,
        "SELECT (SELECT count(*) FROM calls), (SELECT count(*) FROM files), "
        "(SELECT count(*) FROM webhook_events)",
    )
    return tuple(int(n) for n in row)  # type: ignore[call-overload]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def passwordless(postgres_cluster: Cluster, postgres_schema: str) -> Iterator[str]:
    """The test's store URL without its password; PGPASSWORD holds it, as in production."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", postgres_cluster.password)
        yield postgres_cluster.url(schema=postgres_schema, password=False)


def migrate(*args: str) -> tuple[int, str]:
    """``bem-runner store migrate ARGS`` in this process: exit code, stdout and stderr."""
    result = CliRunner().invoke(cli, ["store", "migrate", *args], catch_exceptions=False)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


@pytest.mark.anyio
async def test_a_half_done_state_moves_to_postgresql_and_finishes_there_sending_nothing_twice(
    tmp_path: Path, passwordless: str, postgres_url: str
) -> None:
    emulator = Emulator(
        EmulatorSettings(latency_min=LATENCY, latency_max=LATENCY), clock=lambda: 0.0
    )
    config = make_config(
        tmp_path,
        limits={"max_open_calls": MAX_OPEN_CALLS},
        inbox={"dedupe": "content", "rescan_seconds": 0.1},
    )
    write_files(config.paths.inbox, FIRST)
    async with running(config, emulator, emulator_follows=False) as run:
        await run.until(lambda: emulator.stats()["calls_total"] == len(FIRST))
        emulator.advance(LATENCY * 2)  # the first calls finish
        await run.until(lambda: len(outbox_documents(config.paths.outbox)) == len(FIRST))
        write_files(config.paths.inbox, SECOND)
        # the copy of alpha reuses its result; of the odd names, as many are sent as may be open
        await run.until(
            lambda: (
                emulator.stats()["calls_total"] == len(FIRST) + MAX_OPEN_CALLS
                and "wf/alpha-again.txt" in outbox_documents(config.paths.outbox)
            )
        )
    async with open_sqlite_store(config.paths.state) as store:
        await store.record_webhook_event(
            WebhookEvent("evt-1", "transform", "call-unknown-yet", None), now=1.0, confirm_at=2.0
        )
        counts = await store.counts()
    assert counts.calls.get("polling") == MAX_OPEN_CALLS
    assert counts.calls.get("ready") == len(ODD_NAMES) - MAX_OPEN_CALLS
    assert counts.reused == 1
    before = state_rows(config.paths.state)
    source_digest = digest(config.paths.state)

    code, output = await anyio.to_thread.run_sync(
        migrate, "--from", str(config.paths.state), "--store", passwordless
    )

    assert code == 0, output
    assert f"calls: {len(FIRST) + len(ODD_NAMES)} ({MAX_OPEN_CALLS} open, 2 not sent yet" in output
    assert "results reused (content dedupe, no call): 1" in output
    assert "webhook events: 1" in output
    assert store_rows(postgres_url) == before  # ids, references, call ids and byte names kept
    assert digest(config.paths.state) == source_digest
    [(event_state,)] = run_sql(postgres_url, "SELECT state FROM webhook_events")
    assert event_state == "pending"

    on_postgres = msgspec.structs.replace(config, store_url=Secret(postgres_url))
    outcome = await drain(on_postgres, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == sorted(rel for rel, _ in FIRST + SECOND)
    assert {kind for kind, _ in documents.values()} == {"result"}
    assert outcome.delivered == {"result": len(ODD_NAMES)}
    stats = emulator.stats()
    assert stats["calls_total"] == len(FIRST) + len(ODD_NAMES)
    assert set(stats["calls_by_reference"].values()) == {1}
    polled = {ref for _, ref, _, state in before[0] if state == "polling"}
    assert len(polled) == MAX_OPEN_CALLS
    assert polled <= set(stats["calls_by_reference"])  # the open calls were followed, not resent


def test_the_store_must_be_empty_and_a_failed_copy_leaves_it_empty(
    tmp_path: Path, passwordless: str, postgres_url: str
) -> None:
    state = tmp_path / "state.db"
    make_state(state, files=3)
    assert migrate("--from", str(state), "--store", passwordless)[0] == 0
    copied = row_counts(postgres_url)

    code, output = migrate("--from", str(state), "--store", passwordless)
    assert code == 2
    assert "not empty" in output
    assert row_counts(postgres_url) == copied

    run_sql(postgres_url, "TRUNCATE webhook_events, files, calls")
    broken = tmp_path / "broken.db"
    shutil.copy(state, broken)
    with sqlite3.connect(broken) as db:  # a value PostgreSQL's column cannot hold, last of all
        db.execute("UPDATE calls SET attempts = 1 << 40 WHERE id = (SELECT max(id) FROM calls)")
    code, output = migrate("--from", str(broken), "--store", passwordless)
    assert code == 2
    assert "cannot copy" in output
    assert row_counts(postgres_url) == (0, 0, 0)


def test_a_missing_foreign_or_busy_source_is_refused_naming_why(
    tmp_path: Path, passwordless: str, postgres_url: str
) -> None:
    missing = tmp_path / "nothing.db"
    code, output = migrate("--from", str(missing), "--store", passwordless)
    assert code == 2
    assert "no state database here" in output
    assert not missing.exists()

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    code, output = migrate("--from", str(foreign), "--store", passwordless)
    assert code == 2
    assert "not a bem-runner state database" in output

    text = tmp_path / "notes.txt"
    text.write_text("not a database at all\n" * 100)
    code, output = migrate("--from", str(text), "--store", passwordless)
    assert code == 2
    assert "not a bem-runner state database" in output

    state = tmp_path / "state.db"
    make_state(state, files=1)
    with state_owner(state):  # a runner is still working on it
        code, output = migrate("--from", str(state), "--store", passwordless)
    assert code == 2
    assert f"in use by pid {os.getpid()}" in output

    code, output = migrate("--from", str(state))
    assert code == 2
    assert "no PostgreSQL store to migrate into" in output
    # refused before the target was touched: not even its schema was made
    assert (
        run_sql(postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        == []
    )


NAME_BYTES = st.binary(min_size=1, max_size=40).filter(
    lambda name: b"/" not in name and b"\0" not in name and name not in (b".", b"..")
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(NAME_BYTES, min_size=1, max_size=5, unique=True))
def test_any_file_name_arrives_byte_for_byte(
    tmp_path: Path, passwordless: str, postgres_url: str, names: list[bytes]
) -> None:
    run_sql(
        postgres_url,
        "DROP TABLE IF EXISTS webhook_events, files, calls, runners, rate_bucket, meta CASCADE",
    )
    state = tmp_path / f"state-{hashlib.sha256(b''.join(names)).hexdigest()[:12]}.db"
    state.unlink(missing_ok=True)
    make_state(state, names=names)
    code, output = migrate("--from", str(state), "--store", passwordless)
    assert code == 0, output
    copied = store_rows(postgres_url)
    assert copied == state_rows(state)
    assert {rel for _, rel, _, _ in copied[1]} == {b"wf/" + name for name in names}


def test_the_password_never_shows(
    tmp_path: Path, postgres_cluster: Cluster, passwordless: str
) -> None:
    state = tmp_path / "state.db"
    make_state(state, files=1)
    code, output = migrate("--from", str(state), "--store", passwordless)
    assert code == 0, output
    code, again = migrate("--from", str(state), "--store", passwordless)
    assert code == 2
    assert postgres_cluster.password not in output + again


def make_state(path: Path, *, files: int = 0, names: Sequence[bytes] = ()) -> None:
    """A state with ``files`` queued files (and one per name in ``names``), each its own call,
    made by the SQLite store."""
    rels = [f"wf/f{n}.txt" for n in range(files)] + [os.fsdecode(b"wf/" + n) for n in names]

    async def fill() -> None:
        async with open_sqlite_store(path) as store:
            new = [
                NewFile(rel, 1, n, f"{n:064x}", "text", Destination("wf", "file", rel, shown(rel)))
                for n, rel in enumerate(rels)
            ]
            await store.add_files(new, now=1.0, batch_limits={})

    anyio.run(fill)
