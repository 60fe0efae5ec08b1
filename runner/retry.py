"""``bem-runner retry``: files that ended in an error go back into the inbox as new work."""

from __future__ import annotations

import os
from pathlib import Path

from runner.config import Config
from runner.deliver import fsync_directory
from runner.store.sqlite import SqliteStore


async def requeue_failed(
    store: SqliteStore, config: Config
) -> tuple[list[str], list[tuple[str, str]]]:
    """Bring each failed input back into the inbox and retire its old row.

    The error document stays until the new attempt delivers its own, so a crash in between
    loses nothing. Returns (requeued paths, [(path, why it cannot be retried)]).
    """
    requeued: list[str] = []
    impossible: list[tuple[str, str]] = []
    retired: list[int] = []
    for file in await store.failed_files():
        why = _restore(config, file.rel)
        if why is None:
            requeued.append(file.rel)
            retired.append(file.id)
        else:
            impossible.append((file.rel, why))
    await store.mark_retried(retired)
    return requeued, impossible


def _restore(config: Config, rel: str) -> str | None:
    source = config.paths.inbox / rel
    if not source.exists():
        archived = config.paths.archive / rel
        if not archived.exists():
            return "the input is gone (inbox.on_done = delete, or it was removed)"
        source.parent.mkdir(parents=True, exist_ok=True)
        os.replace(archived, source)
        fsync_directory(source.parent)
    # a new mtime makes the watcher see new work even where inputs are kept
    os.utime(source)
    return None


__all__ = ["requeue_failed"]
_ = Path
