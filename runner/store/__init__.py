"""Where the pipeline journals its work: :func:`open_store` picks the store for a target."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from runner.errors import StoreError
from runner.store.base import DEFAULT_LEASE_SECONDS, Store, this_runner_id

__all__ = ["DEFAULT_LEASE_SECONDS", "Store", "is_postgres_url", "open_store", "this_runner_id"]

URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(URL_SCHEMES)


@asynccontextmanager
async def open_store(
    target: str | Path,
    *,
    read_only: bool = False,
    runner_id: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> AsyncIterator[Store]:
    """Open the store at ``target``: a ``postgresql://`` URL, else a SQLite state file's path.

    Without ``runner_id`` a writer owns the store (a second is refused). With one, a PostgreSQL
    store is shared: this runner joins it, its claims last ``lease_seconds`` unless it beats its
    heart, and its stages must claim their work (``claim_*``). SQLite has one owner either way.

    A URL's password may come from the URL, ``PGPASSWORD``, ``PGPASSFILE`` (libpq reads those)
    or ``$CREDENTIALS_DIRECTORY/store-password``; no message ever shows it. Typed as
    :class:`Store`, so mypy proves every store this hands out satisfies the protocol.
    """
    # imported here so that importing the protocol never loads an engine
    if is_postgres_url(target):
        try:
            from runner.store.postgres import open_postgres_store
        except ImportError as exc:
            raise StoreError(
                f"a PostgreSQL store needs psycopg ({exc.name} is missing): "
                "pip install 'bem-runner[postgres]'"
            ) from None
        async with open_postgres_store(
            str(target), read_only=read_only, runner_id=runner_id, lease_seconds=lease_seconds
        ) as pg:
            yield pg
        return
    from runner.store.sqlite import open_sqlite_store

    async with open_sqlite_store(Path(target), read_only=read_only) as sqlite:
        yield sqlite
