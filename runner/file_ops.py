"""File operations below a root (the outbox's, the archive's): folders opened and made,
documents written atomically (temporary, fsync, rename, fsync the folder), files removed.

Below the configured root no symbolic link is followed: each folder is opened relative to its
parent with ``O_NOFOLLOW``, and files are created, renamed and removed relative to the folder's
descriptor. A symbolic link in the way is an error that can never succeed, like a file where a
folder should be.

Which errors can never succeed (:func:`is_permanent`) decides whether a write is retried or its
name passed over.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from runner import faults
from runner.outbox import SINGLE_OWNER_TOKEN, Limits, Place, temporary_name, temporary_token

FILE_MODE = 0o600
FOLDER_MODE = 0o700
OPEN_FOLDERS = 64
"""Folders kept open at once while writing a page of documents."""

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# ---------------------------------------------------------------------------------------------
# Which errors can never succeed


def _codes(*symbols: str) -> frozenset[int]:
    return frozenset(getattr(errno, s) for s in symbols if hasattr(errno, s))


PERMANENT_ERRORS: frozenset[int] = _codes(
    "EEXIST",  # a name in the way that is not ours to replace
    "EFBIG",
    "EILSEQ",  # a file system that refuses the name's bytes
    "EINVAL",
    "EISDIR",
    "ELOOP",  # a symbolic link where a folder should be
    "EMLINK",
    "ENAMETOOLONG",
    "ENODEV",
    "ENOTDIR",
    "ENOTEMPTY",
    "ENOTSUP",
    "ENXIO",
    "EOPNOTSUPP",
    "EXDEV",
)
"""Errors that say this name can never hold the file, however long one waits."""


def is_permanent(code: int | None) -> bool:
    """Whether an outbox or archive write that failed with ``code`` can never succeed.

    Anything else (disk full, read-only, permission, I/O errors, and errors not known here)
    may succeed later, so it is retried.
    """
    return code in PERMANENT_ERRORS


# ---------------------------------------------------------------------------------------------
# Folders, opened without following symbolic links


def open_root(root: Path, *, create: bool) -> int:
    """The configured root (which itself may be reached through a link)."""
    if create:
        root.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_folder(root_fd: int, folders: Sequence[str], *, create: bool) -> int:
    """A folder below the root, never reached through a symbolic link; made if asked."""
    fd = os.dup(root_fd)
    try:
        for part in folders:
            child = _open_child(fd, part, create=create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(parent_fd: int, part: str, *, create: bool) -> int:
    try:
        return os.open(part, _FOLDER_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # something is there: the open below says what
        os.mkdir(part, FOLDER_MODE, dir_fd=parent_fd)
        os.fsync(parent_fd)  # the new folder's entry must last as long as what goes in it
    return os.open(part, _FOLDER_FLAGS, dir_fd=parent_fd)


def fsync_folder(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
        # a file system that cannot sync folders: no later attempt would do better


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_folder(fd)
    finally:
        os.close(fd)


class Folders:
    """The folders below one root that a page of writes uses: each opened once, synced once.

    Raises the root's own error when the root cannot be opened: that is never one file's fault.
    """

    def __init__(self, root: Path, *, token: str = SINGLE_OWNER_TOKEN) -> None:
        self.root = root
        self.token = token
        """This runner's token in the temporaries it writes (:func:`runner.outbox.runner_token`)."""
        self._root_fd = open_root(root, create=True)
        try:
            self.limits = Limits.of(self._root_fd)
        except OSError:
            os.close(self._root_fd)
            raise
        self._open: dict[tuple[str, ...], int] = {}
        self._dirty: set[tuple[str, ...]] = set()
        self._failed: dict[tuple[str, ...], OSError] = {}

    def __enter__(self) -> Folders:
        return self

    def __exit__(self, *_: object) -> None:
        self._close_below_root()
        os.close(self._root_fd)

    def fd(self, folders: tuple[str, ...], *, create: bool) -> int:
        if not folders:
            return self._root_fd
        fd = self._open.get(folders)
        if fd is None:
            if len(self._open) >= OPEN_FOLDERS:
                self._sync_dirty()
                self._close_below_root()
            fd = open_folder(self._root_fd, folders, create=create)
            self._open[folders] = fd
        return fd

    def changed(self, folders: tuple[str, ...]) -> None:
        self._dirty.add(folders)

    def sync(self) -> dict[tuple[str, ...], OSError]:
        """fsync every changed folder; the ones that failed (on this page), with their error."""
        self._sync_dirty()
        return dict(self._failed)

    def _sync_dirty(self) -> None:
        for folders in sorted(self._dirty):  # a changed folder stays open until it is synced
            try:
                fsync_folder(self._open[folders] if folders else self._root_fd)
            except OSError as exc:
                self._failed[folders] = exc
        self._dirty.clear()

    def _close_below_root(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


# ---------------------------------------------------------------------------------------------
# Files


def write_atomic_at(
    folder_fd: int, name: str, data: bytes, *, name_max: int, token: str = SINGLE_OWNER_TOKEN
) -> None:
    """Temporary file, fsync, rename, all relative to the folder; the caller syncs the folder.

    The temporary's name depends only on the target and the runner's ``token``, so a temporary
    left by a process killed before the rename is replaced by that runner's next delivery of the
    same document, and another runner's (:func:`remove_dead_temporaries`) once it is gone.
    """

    def fill(fh: BinaryIO) -> None:
        fh.write(data)
        fh.flush()
        faults.point("deliver.before_fsync")
        os.fsync(fh.fileno())
        faults.point("deliver.after_fsync")

    replace_via_temporary(folder_fd, name, fill, name_max=name_max, token=token, point=faults.point)


def replace_via_temporary(
    folder_fd: int,
    name: str,
    fill: Callable[[BinaryIO], None],
    *,
    name_max: int,
    token: str = SINGLE_OWNER_TOKEN,
    point: Callable[[str], None] | None = None,
) -> None:
    """Create the temporary, let ``fill`` write and fsync it, rename it over ``name``."""
    temporary = temporary_name(name, name_max, token)
    fd = _create(folder_fd, temporary)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
        if point is not None:
            point("deliver.before_rename")
        os.replace(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that got us here is the one to report
            unlink_at(folder_fd, temporary)
        raise
    if point is not None:
        point("deliver.after_rename")


def _create(folder_fd: int, name: str) -> int:
    """A new file: never opened through a link, never written into someone else's file."""
    try:
        return os.open(name, _CREATE_FLAGS, FILE_MODE, dir_fd=folder_fd)
    except FileExistsError:
        os.unlink(name, dir_fd=folder_fd)  # a temporary left by a crash
        return os.open(name, _CREATE_FLAGS, FILE_MODE, dir_fd=folder_fd)


def unlink_at(folder_fd: int, name: str) -> bool:
    """Remove the file if it is there; whether it was."""
    try:
        os.unlink(name, dir_fd=folder_fd)
    except FileNotFoundError:
        return False
    return True


def write_atomic(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Write ``path`` atomically (its folder is made, and reached as an ordinary path)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(fd, path.name, data, name_max=Limits.of(fd).name_max)
        if sync_directory:
            fsync_folder(fd)
    finally:
        os.close(fd)


def remove_places(folders: Folders, places: Iterable[Place]) -> set[tuple[str, ...]]:
    """Remove each place's file and temporary where they exist; the folders changed.

    A place that cannot hold a file of ours (a folder, a link or a file where a folder should
    be, a folder that does not exist) has nothing to remove. Other errors are raised.
    """
    changed: set[tuple[str, ...]] = set()
    for place in places:
        try:
            fd = folders.fd(place.folders, create=False)
        except OSError as exc:
            if exc.errno == errno.ENOENT or is_permanent(exc.errno):
                continue
            raise
        temporary = temporary_name(place.name, folders.limits.name_max, folders.token)
        for name in (place.name, temporary):
            try:
                removed = unlink_at(fd, name)
            except OSError as exc:
                if is_permanent(exc.errno):  # a folder by that name: not a document
                    continue
                raise
            if removed:
                folders.changed(place.folders)
                changed.add(place.folders)
    return changed


def remove_dead_temporaries(root: Path, live_tokens: Collection[str]) -> list[Path]:
    """Remove the temporaries below ``root`` of runners whose token is not in ``live_tokens``
    (they died before their rename); the paths removed. Nothing else is touched, nor followed
    through a link."""
    removed: list[Path] = []
    for folder, _, files in os.walk(root):  # links to folders are not followed
        for name in files:
            token = temporary_token(name)
            if token is None or token in live_tokens:
                continue
            path = Path(folder, name)
            with contextlib.suppress(FileNotFoundError):  # its owner's rename came first
                path.unlink()
                removed.append(path)
    return removed
