"""Where the pipeline journals its work: :func:`open_store` picks the store for a target."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from runner.store.base import Store

__all__ = ["Store", "open_store"]


@asynccontextmanager
async def open_store(target: str | Path, *, read_only: bool = False) -> AsyncIterator[Store]:
    """Open the store at ``target``: the SQLite state database at that path.

    Typed as :class:`Store`, so mypy proves every store it can hand out satisfies the protocol.
    """
    # imported here so that importing the protocol never loads an engine
    from runner.store.sqlite import open_sqlite_store

    async with open_sqlite_store(Path(target), read_only=read_only) as store:
        yield store
