"""Finished inputs: archived (same relative path), deleted, or kept, per ``inbox.on_done``.

Safe to repeat after a crash. A file replaced after it was taken is new work and stays in the
inbox; an input that can never be archived (its name too long there, a folder or symlink in the
way) is left where it is, logged once, and the file still finishes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec
import structlog

from runner import faults, names
from runner.file_ops import (
    FILE_MODE,
    fsync_directory,
    is_permanent,
    open_folder,
    open_root,
    replace_via_temporary,
)
from runner.outbox import SINGLE_OWNER_TOKEN, Limits, Place, fits, shown_place
from runner.store.base import FileRow

log = structlog.get_logger("runner.archive")

# ---------------------------------------------------------------------------------------------
# Finishing inputs (blocking; run in a worker thread)


class LeftInPlace(msgspec.Struct, frozen=True):
    """An input that can never be archived: it stays in the inbox, and its file is finished."""

    reason: str


FinishOutcome = LeftInPlace | OSError | None
"""Per file: None when finished, why it stays in the inbox, or the error to retry after."""


class CannotFinish(Exception):
    """The input can never be archived (or deleted) as it is."""


def finish_inputs(
    inbox: Path,
    archive: Path,
    files: Sequence[FileRow],
    on_done: str,
    *,
    token: str = SINGLE_OWNER_TOKEN,
) -> list[FinishOutcome]:
    """Archive, delete or keep delivered inputs, then fsync the directories touched once each.

    Safe to repeat after a crash. ``token`` names this runner's temporaries in the archive (only
    written when it is on another file system than the inbox).
    """
    results: list[FinishOutcome] = []
    touched: list[set[Path]] = []
    for file in files:
        try:
            touched.append(
                finish_input(
                    inbox,
                    archive,
                    file.rel,
                    on_done,
                    taken=(file.size, file.mtime_ns),
                    token=token,
                )
            )
            results.append(None)
        except CannotFinish as exc:
            touched.append(set())
            results.append(LeftInPlace(str(exc)))
        except OSError as exc:
            touched.append(set())
            results.append(exc)
    faults.point("archive.before_fsync")
    failed = _sync_directories(set().union(*touched))
    faults.point("archive.after_fsync")
    return [
        next((failed[d] for d in dirs if d in failed), result)
        for result, dirs in zip(results, touched, strict=True)
    ]


def _sync_directories(directories: set[Path]) -> dict[Path, OSError]:
    """fsync each directory; the ones that failed, with their error."""
    failed: dict[Path, OSError] = {}
    for directory in sorted(directories):
        try:
            fsync_directory(directory)
        except OSError as exc:
            failed[directory] = exc
    return failed


def finish_input(
    inbox: Path,
    archive: Path,
    rel: str,
    on_done: str,
    *,
    taken: tuple[int, int] | None = None,
    token: str = SINGLE_OWNER_TOKEN,
) -> set[Path]:
    """Archive, delete or keep one delivered input; return the directories to fsync.

    ``taken`` is the (size, mtime_ns) the file had when it was taken: a file that was replaced
    since is new work and is left in the inbox, never archived or deleted unseen. Raises
    :class:`CannotFinish` when the archive can never take it.
    """
    source = inbox / rel
    if on_done == "keep":
        return set()
    try:
        replaced = taken is not None and _replaced(source, taken)
        if on_done == "delete" and not replaced:
            return _delete(source)
    except OSError as exc:
        raise _cannot_finish_or(exc, names.shown(str(source))) from exc
    if replaced:
        log.info(
            "input replaced after it was taken; leaving the new one in the inbox",
            file=names.shown(rel),
        )
        return set()
    root_fd = open_root(archive, create=True)  # the archive itself: retried, never one file's
    try:
        return _archive(source, archive, root_fd, rel, token)
    finally:
        os.close(root_fd)


def _delete(source: Path) -> set[Path]:
    try:
        source.unlink()
    except FileNotFoundError:
        return set()
    return {source.parent}


def _archive(source: Path, archive: Path, root_fd: int, rel: str, token: str) -> set[Path]:
    *folders, name = rel.split("/")
    place = Place(tuple(folders), name)
    if not fits(archive, place, Limits.of(root_fd)):
        raise CannotFinish(f"{shown_place(archive, place)}: too long for the file system")
    if not os.path.lexists(source):
        return _finish_earlier_archive(archive, root_fd, place, source)
    try:
        fd = open_folder(root_fd, place.folders, create=True)
    except OSError as exc:
        raise _cannot_finish_or(exc, shown_place(archive, place)) from exc
    try:
        faults.point("archive.before_rename")
        try:
            _move(source, fd, name, token)
        except OSError as exc:
            raise _cannot_finish_or(exc, shown_place(archive, place)) from exc
        faults.point("archive.after_rename")
        _make_private(fd, name)
    finally:
        os.close(fd)
    return {place.path(archive).parent, source.parent}


def _finish_earlier_archive(archive: Path, root_fd: int, place: Place, source: Path) -> set[Path]:
    """The input is gone: if an earlier attempt archived it, finish what that one may not have."""
    try:
        fd = open_folder(root_fd, place.folders, create=False)
    except OSError as exc:
        if exc.errno == errno.ENOENT or is_permanent(exc.errno):
            return set()  # not archived here: removed by someone else
        raise
    try:
        if not _make_private(fd, place.name):
            return set()
    finally:
        os.close(fd)
    return {place.path(archive).parent, source.parent}  # the syncs may not have happened


def _cannot_finish_or(exc: OSError, where: str) -> Exception:
    """:class:`CannotFinish` for an error that can never succeed, else the error itself."""
    if is_permanent(exc.errno):
        return CannotFinish(f"{where}: {exc.strerror}")
    return exc


def _move(source: Path, folder_fd: int, name: str, token: str) -> None:
    try:
        os.replace(source, name, dst_dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # archive on another file system
            raise
        _copy_into(source, folder_fd, name, token)
        source.unlink()


def _copy_into(source: Path, folder_fd: int, name: str, token: str) -> None:
    st = source.stat()

    def fill(fh: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, fh)
        fh.flush()
        os.utime(fh.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fh.fileno())

    name_max = Limits.of(folder_fd).name_max
    replace_via_temporary(folder_fd, name, fill, name_max=name_max, token=token)


def _make_private(folder_fd: int, name: str) -> bool:
    """chmod an archived input (never through a link); whether it is there."""
    try:
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, FILE_MODE, dir_fd=folder_fd)
    return True


def _replaced(source: Path, taken: tuple[int, int]) -> bool:
    try:
        st = source.lstat()
    except FileNotFoundError:
        return False
    return (st.st_size, st.st_mtime_ns) != taken
