"""``bem-runner retry``: files that ended in an error go back into the inbox as new work."""

from __future__ import annotations

import os
from pathlib import Path

from runner.config import Config
from runner.file_ops import fsync_directory
from runner.scan import Entry, examine
from runner.store.base import FileRow, Store


async def requeue_failed(store: Store, config: Config) -> tuple[list[str], list[tuple[str, str]]]:
    """Bring each failed input back into the inbox and retire its old row.

    The error document stays until the new attempt delivers its own, so a crash in between
    loses nothing. A file that was refused before it was ever sent (unsupported, empty, too
    large, no route) is requeued only if it would now be taken — the file or the configuration
    changed. Returns (requeued paths, [(path, why it cannot be retried)]).
    """
    requeued: list[str] = []
    impossible: list[tuple[str, str]] = []
    retired: list[int] = []
    for file in await store.failed_files():
        why = _restore(config, file)
        if why is None:
            requeued.append(file.rel)
            retired.append(file.id)
        else:
            impossible.append((file.rel, why))
    await store.mark_retried(retired)
    return requeued, impossible


def _restore(config: Config, file: FileRow) -> str | None:
    paths = config.paths
    source = paths.inbox / file.rel
    archived = paths.archive / file.rel
    where = paths.inbox if source.exists() else paths.archive if archived.exists() else None
    if where is None:
        return (
            f"the input is gone: not in the inbox ({source}) nor in the archive "
            f"({archived}); inbox.on_done = {config.inbox.on_done!r}"
        )
    if file.call_row_id is None and (why := _still_refused(config, where, file)) is not None:
        return f"it would be refused again: {why}"
    if where == paths.archive:
        source.parent.mkdir(parents=True, exist_ok=True)
        os.replace(archived, source)
        fsync_directory(source.parent)
    # a new mtime makes the watcher see new work even where inputs are kept
    os.utime(source)
    return None


def _still_refused(config: Config, root: Path, file: FileRow) -> str | None:
    """Why a file refused at intake would be refused again as it is now, if it would."""
    st = (root / file.rel).lstat()
    examined = examine(
        root,
        Entry(file.rel, st.st_size, st.st_mtime_ns),
        routes=config.routes,
        max_file_bytes=config.inbox.max_file_bytes,
    )
    return examined.reason if examined is not None else "the input vanished"


__all__ = ["requeue_failed"]
