"""Outbox names, and the file operations that put a document under one.

Names
-----
A file's result goes to ``<outbox>/<rel>.json`` and its error to ``<outbox>/<rel>.error.json``,
``rel`` being its exact path in the inbox (bytes that are not UTF-8 included). When that
*natural* name cannot hold the document, the document goes to the file's *alternative* name,
the same on every attempt::

    <name cut to fit>~<hash>.json            <name cut to fit>~<hash>.error.json

``<hash>`` is the first 16 hex digits of the SHA-256 of ``rel``'s bytes, so two files never
share an alternative name. The name is shown as valid UTF-8 (a byte that is not UTF-8 becomes
``\\xNN``) and cut at a character boundary so that the whole fits the file system's NAME_MAX
(and the whole path stays under PATH_MAX). The alternative goes in the file's own folder when
that folder can hold it, else straight under the outbox root. Either way the document's
``"file"`` (and ``"fileBase64"``) names the input. The natural name is passed over when:

- a component of it is longer than NAME_MAX, or the whole path reaches PATH_MAX;
- it is the result of a file whose name ends in ``.error`` (``x.error.json`` is the error
  document of ``x``, so the result of ``x.error`` cannot be there too);
- writing it failed in a way that can never succeed (:func:`is_permanent`): a folder, a file or
  a symbolic link in the way.

A temporary file is ``.<name>.tmp`` beside its target, or ``.<name cut>~<hash>.tmp`` when that
would be longer than NAME_MAX.

File operations
---------------
Below the configured root no symbolic link is followed: each folder is opened relative to its
parent with ``O_NOFOLLOW``, and files are created, renamed and removed relative to the folder's
descriptor. A symbolic link in the way is an error that can never succeed, like a file where a
folder should be.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from runner import faults, names

Kind = Literal["result", "error"]
KINDS: tuple[Kind, ...] = ("result", "error")
RESULT_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"
SUFFIXES: dict[Kind, str] = {"result": RESULT_SUFFIX, "error": ERROR_SUFFIX}
HASH_DIGITS = 16
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
# Names (pure)


@dataclass(frozen=True)
class Limits:
    name_max: int = 255
    path_max: int = 4096

    @classmethod
    def of(cls, folder_fd: int) -> Limits:
        return cls(os.fpathconf(folder_fd, "PC_NAME_MAX"), os.fpathconf(folder_fd, "PC_PATH_MAX"))


@dataclass(frozen=True)
class Place:
    """A name below a root: the folders that lead to it, then its own name."""

    folders: tuple[str, ...]
    name: str

    def path(self, root: Path) -> Path:
        return root.joinpath(*self.folders, self.name)


def size(text: str) -> int:
    """Length in bytes of a name as the file system sees it."""
    return len(names.raw(text))


def short_hash(text: str) -> str:
    return hashlib.sha256(names.raw(text)).hexdigest()[:HASH_DIGITS]


def cut(text: str, budget: int) -> str:
    """The longest start of ``text`` of at most ``budget`` bytes that ends between characters."""
    kept: list[str] = []
    used = 0
    for character in text:
        used += size(character)
        if used > budget:
            break
        kept.append(character)
    return "".join(kept)


def fits(root: Path, place: Place, limits: Limits) -> bool:
    """Whether every component fits NAME_MAX and the whole path stays under PATH_MAX."""
    parts = (*place.folders, place.name)
    if any(size(part) > limits.name_max for part in parts):
        return False
    total = size(os.path.abspath(root)) + sum(1 + size(part) for part in parts)
    return total < limits.path_max


def natural_place(rel: str, kind: Kind) -> Place:
    *folders, name = rel.split("/")
    return Place(tuple(folders), name + SUFFIXES[kind])


def alternative_name(rel: str, kind: Kind, room: int) -> str | None:
    """``<name cut>~<hash><suffix>`` in at most ``room`` bytes; None when even that is too long.

    Always valid UTF-8 (the name as :func:`names.shown` gives it), so that a file system that
    refuses other bytes still takes it; the hash keeps the exact bytes apart.
    """
    tail = f"~{short_hash(rel)}{SUFFIXES[kind]}"
    budget = room - size(tail)
    if budget < 1:
        return None
    return cut(names.shown(rel.rsplit("/", 1)[-1]), budget) + tail


def room(root: Path, folders: Sequence[str], limits: Limits) -> int:
    """The longest name that fits in this folder (NAME_MAX, and the path under PATH_MAX)."""
    used = size(os.path.abspath(root)) + sum(1 + size(part) for part in folders) + 1
    return min(limits.name_max, limits.path_max - 1 - used)


def claims_natural(rel: str, kind: Kind) -> bool:
    """Whether the natural name belongs to this document (see the module's docstring)."""
    return not (kind == "result" and rel.endswith(ERROR_SUFFIX.removesuffix(RESULT_SUFFIX)))


def document_places(root: Path, rel: str, kind: Kind, limits: Limits) -> list[Place]:
    """Where a document of this kind may go, best first; each fits the file system."""
    natural = natural_place(rel, kind)
    candidates = [natural] if claims_natural(rel, kind) else []
    for folders in (natural.folders, ()):
        alternative = alternative_name(rel, kind, room(root, folders, limits))
        if alternative is not None:
            candidates.append(Place(folders, alternative))
    return [p for p in dict.fromkeys(candidates) if fits(root, p, limits)]


def temporary_name(name: str, name_max: int) -> str:
    """The temporary beside ``name``: fits whenever ``name`` does, and depends only on it."""
    plain = f".{name}.tmp"
    if size(plain) <= name_max:
        return plain
    tail = f"~{short_hash(name)}.tmp"
    return "." + cut(name, name_max - 1 - size(tail)) + tail


def shown_place(root: Path, place: Place) -> str:
    return names.shown(str(place.path(root)))


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

    def __init__(self, root: Path) -> None:
        self.root = root
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


def write_atomic_at(folder_fd: int, name: str, data: bytes, *, name_max: int) -> None:
    """Temporary file, fsync, rename, all relative to the folder; the caller syncs the folder.

    The temporary's name depends only on the target, so a temporary left by a process killed
    before the rename is replaced by the next delivery of the same document.
    """

    def fill(fh: BinaryIO) -> None:
        fh.write(data)
        fh.flush()
        faults.point("deliver.before_fsync")
        os.fsync(fh.fileno())
        faults.point("deliver.after_fsync")

    replace_via_temporary(folder_fd, name, fill, name_max=name_max, point=faults.point)


def replace_via_temporary(
    folder_fd: int,
    name: str,
    fill: Callable[[BinaryIO], None],
    *,
    name_max: int,
    point: Callable[[str], None] | None = None,
) -> None:
    """Create the temporary, let ``fill`` write and fsync it, rename it over ``name``."""
    temporary = temporary_name(name, name_max)
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
        for name in (place.name, temporary_name(place.name, folders.limits.name_max)):
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
