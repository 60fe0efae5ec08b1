"""What the PostgreSQL store adds to the contract: migration under a lock, ownership, passwords.

The contract itself (tests/test_store_contract.py) runs on this store unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from runner.errors import StateInUseError, StoreError
from runner.names import from_raw
from runner.route import Destination
from runner.store import open_store
from runner.store.base import Finished, NewFile
from runner.store.postgres import (
    OWNER_LOCK,
    POOL_SIZE,
    SCHEMA_VERSION,
    PostgresStore,
    Target,
    open_postgres_store,
    shown_url,
)
from runner.store.postgres_setup import connect, disown, migrate, own
from runner.store.postgres_target import connect_kwargs
from runner.store.sqlite import SqliteStore
from tests.conftest import run_sql

if TYPE_CHECKING:
    from tests.postgres import Cluster

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]


def _new_file(rel: str, *, reason: str | None = None) -> NewFile:
    return NewFile(rel, 1, 1, None, "text", Destination("wf", "file", rel, "x"), reason)


async def test_runners_starting_together_migrate_once(postgres_url: str) -> None:
    opened: list[int] = []

    async def start(n: int) -> None:
        async with open_postgres_store(postgres_url, runner_id=f"runner-{n}") as store:
            opened.append(await store.unfinished_work())

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(start, n)
    assert opened == [0] * 6
    assert run_sql(postgres_url, "SELECT key, value FROM meta ORDER BY key") == [
        ("application", "bem-runner"),
        ("schema_version", str(SCHEMA_VERSION)),
    ]


async def test_reopening_keeps_the_data_and_migrates_nothing(postgres_url: str) -> None:
    async with open_postgres_store(postgres_url) as store:
        await store.add_files([_new_file("wf/a")], now=1.0, batch_limits={})
    async with open_postgres_store(postgres_url) as store:
        assert set(await store.known_files()) == {"wf/a"}
        assert await store.integrity_check() == "ok"


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    async with open_postgres_store(postgres_url):
        pass
    run_sql(postgres_url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer"):
        async with open_postgres_store(postgres_url):
            pass


async def test_someone_elses_tables_are_refused(postgres_url: str) -> None:
    run_sql(postgres_url, "CREATE TABLE files (id INTEGER)")
    with pytest.raises(StoreError, match="not a bem-runner store"):
        async with open_postgres_store(postgres_url):
            pass
    run_sql(postgres_url, "CREATE TABLE meta (key TEXT, value TEXT)")
    with pytest.raises(StoreError, match="not ours"):
        async with open_postgres_store(postgres_url):
            pass


async def test_a_second_writer_is_refused_while_a_reader_is_welcome(postgres_url: str) -> None:
    async with open_postgres_store(postgres_url) as store:
        with pytest.raises(StateInUseError, match=r"in use by bem-runner .* pid \d+"):
            async with open_postgres_store(postgres_url):
                pass
        async with open_postgres_store(postgres_url, read_only=True) as reader:
            await store.add_files([_new_file("wf/a")], now=1.0, batch_limits={})
            assert set(await reader.known_files()) == {"wf/a"}
    # the owner is gone: the next writer takes the store
    async with open_postgres_store(postgres_url) as store:
        assert set(await store.known_files()) == {"wf/a"}


async def test_an_owner_whose_connection_dies_releases_the_store(postgres_url: str) -> None:
    async with open_postgres_store(postgres_url):
        # what the server does when the owner's host dies: its session ends
        run_sql(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            f" AND classid = {OWNER_LOCK} AND objid = hashtext(current_schema())::oid",
        )
        async with open_postgres_store(postgres_url) as second:
            assert await second.unfinished_work() == 0


async def test_an_owner_gives_the_store_up_before_its_connection_closes(
    postgres_url: str,
) -> None:
    """The server frees a closed connection's lock only when its backend has exited, maybe after
    a restarted runner's try; the owner unlocks first, so its successor is never refused."""
    target = Target.from_url(postgres_url, {})
    kwargs = connect_kwargs(target)
    owner = await connect(target, kwargs)
    try:
        await migrate(owner, target)
        await own(owner, target)
        await disown(owner)
        async with open_postgres_store(postgres_url) as successor:  # the first still connected
            assert await successor.unfinished_work() == 0
    finally:
        await owner.close()


async def test_a_reader_needs_an_existing_store(postgres_url: str) -> None:
    with pytest.raises(StoreError, match="no bem-runner store here"):
        async with open_postgres_store(postgres_url, read_only=True):
            pass
    assert run_sql(postgres_url, "SELECT to_regclass('meta')") == [(None,)]


async def test_open_store_picks_the_store_by_its_target(postgres_url: str, tmp_path: Path) -> None:
    async with open_store(postgres_url) as store:
        assert isinstance(store, PostgresStore)
    async with open_store(postgres_url, runner_id="r1", lease_seconds=5.0) as store:
        assert [r.id for r in await store.runners()] == ["r1"]
    async with open_store(tmp_path / "state.db") as store:
        assert isinstance(store, SqliteStore)
    async with open_store(str(tmp_path / "other.db")) as store:
        assert isinstance(store, SqliteStore)


async def test_names_are_stored_as_their_exact_bytes(postgres_url: str) -> None:
    rel = from_raw(b"wf/caf\xe9 \xff.txt")
    async with open_postgres_store(postgres_url) as store:
        await store.add_files([_new_file(rel)], now=1.0, batch_limits={})
    assert run_sql(postgres_url, "SELECT rel FROM files") == [(b"wf/caf\xe9 \xff.txt",)]
    assert run_sql(postgres_url, "SELECT batch_key FROM calls") == [(b"wf/caf\xe9 \xff.txt",)]


async def test_a_nul_in_a_message_from_bem_does_not_stop_the_store(postgres_url: str) -> None:
    async with open_postgres_store(postgres_url) as store:
        await store.add_files([_new_file("wf/a")], now=1.0, batch_limits={})
        (call,) = await store.ready_calls(now=1.0, limit=1)
        await store.mark_terminal([Finished(call.id, "failed", None, "bad\0byte")], now=2.0)
        assert (await store.call(call.id)).error_reason == "bad\ufffdbyte"


# -- passwords ----------------------------------------------------------------------------------


async def test_the_password_may_come_from_pgpassword(
    postgres_cluster: Cluster, postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", postgres_cluster.password)
    async with open_postgres_store(
        postgres_cluster.url(schema=postgres_schema, password=False)
    ) as store:
        assert await store.unfinished_work() == 0


async def test_the_password_may_come_from_a_pgpass_file(
    postgres_cluster: Cluster,
    postgres_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(
        f"127.0.0.1:{postgres_cluster.port}:*:postgres:{postgres_cluster.password}\n"
    )
    passfile.chmod(0o600)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    async with open_postgres_store(
        postgres_cluster.url(schema=postgres_schema, password=False)
    ) as store:
        assert await store.unfinished_work() == 0


async def test_the_password_may_come_from_the_credentials_directory(
    postgres_cluster: Cluster, postgres_schema: str, tmp_path: Path
) -> None:
    (tmp_path / "store-password").write_text(postgres_cluster.password + "\n")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    url = postgres_cluster.url(schema=postgres_schema, password=False)
    async with open_postgres_store(url, environ=environ) as store:
        assert await store.unfinished_work() == 0


@pytest.mark.parametrize("where", ["url", "PGPASSWORD", "credentials"])
async def test_a_wrong_password_is_a_clear_error_that_never_shows_it(
    postgres_cluster: Cluster,
    postgres_schema: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    wrong = "Wr0ng-s3cret-XYZ"
    url = postgres_cluster.url(schema=postgres_schema, password=False)
    environ: dict[str, str] = {}
    monkeypatch.delenv("PGPASSWORD", raising=False)
    if where == "url":
        url = url.replace("postgres@", f"postgres:{wrong}@")
    elif where == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", wrong)
        environ["PGPASSWORD"] = wrong
    else:
        (tmp_path / "store-password").write_text(wrong)
        environ["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    with pytest.raises(StoreError) as caught:
        async with open_postgres_store(url, environ=environ):
            pass
    message = str(caught.value)
    assert "password authentication failed" in message
    assert f"postgresql://postgres@127.0.0.1:{postgres_cluster.port}/postgres" in message
    assert wrong not in message
    assert wrong not in repr(caught.value.__cause__)
    assert caught.value.__suppress_context__


async def test_an_unreachable_server_is_a_clear_error_without_the_password(
    postgres_cluster: Cluster,
) -> None:
    url = f"postgresql://bem:Sup3r-secret@127.0.0.1:{postgres_cluster.port + 1}/x"
    with pytest.raises(StoreError, match="cannot connect") as caught:
        async with open_store(url):
            pass
    assert "Sup3r-secret" not in str(caught.value)
    assert f"postgresql://bem@127.0.0.1:{postgres_cluster.port + 1}/x" in str(caught.value)


def test_urls_are_shown_without_their_password() -> None:
    for url in (
        "postgresql://bem:hunter22@db.internal:5432/bem_runner",
        "postgres://bem:hunter22@db.internal:5432/bem_runner?sslmode=require",
        "postgresql://bem@db.internal:5432/bem_runner?password=hunter22",
    ):
        target = Target.from_url(url, {})
        assert target.shown == "postgresql://bem@db.internal:5432/bem_runner"
        assert target.scrub("FATAL: hunter22 is wrong") == "FATAL: *** is wrong"
    assert (
        shown_url({"host": "/run/postgresql", "dbname": "x"}) == "postgresql://[/run/postgresql]/x"
    )


def test_a_malformed_url_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(StoreError, match="not a valid PostgreSQL URL") as caught:
        Target.from_url("postgresql://bem:hunter22@db/x?nosuchoption=1", {})
    assert "hunter22" not in str(caught.value)


async def test_the_store_comes_back_after_postgresql_restarts(
    postgres_cluster: Cluster, postgres_url: str
) -> None:
    async with open_postgres_store(postgres_url) as store:
        await store.add_files([_new_file("wf/a")], now=1.0, batch_limits={})
        postgres_cluster.restart()
        failures = 0
        for _ in range(POOL_SIZE + 1):
            try:
                await store.add_files([_new_file(f"wf/b{failures}")], now=2.0, batch_limits={})
                break
            except StoreError:  # a pooled connection the restart cut
                failures += 1
        assert failures <= POOL_SIZE
        assert len(await store.known_files()) == 2


async def test_two_schemas_of_one_database_are_two_stores(
    postgres_cluster: Cluster, postgres_url: str
) -> None:
    other = postgres_cluster.new_schema()
    try:
        async with (
            open_postgres_store(postgres_url) as first,
            open_postgres_store(postgres_cluster.url(schema=other)) as second,
        ):
            await first.add_files([_new_file("wf/a")], now=1.0, batch_limits={})
            assert await second.known_files() == {}
    finally:
        postgres_cluster.drop_schema(other)
