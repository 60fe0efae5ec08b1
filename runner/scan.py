"""Reading the inbox: which regular files are there, which have settled, and what each one is.

Scanning is plain ``os.scandir`` that never follows a symlink and never opens anything that is
not a regular file. A file is taken once its size and mtime have not changed for
``settle_seconds``; a file whose mtime is already that old is taken on first sight, so a drain
of a quiet folder does not wait. Pure functions and blocking I/O only: :mod:`runner.watch` runs
them in worker threads.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import msgspec
import structlog

from runner.route import INPUT_TYPES, Route, input_type_for, is_ignored, route_file
from runner.store.base import LEFT_IN_INBOX, KnownFile, NewFile

log = structlog.get_logger("runner.watch")

HASH_CHUNK = 1 << 20


class Entry(msgspec.Struct, frozen=True):
    """A regular file seen in the inbox."""

    rel: str
    size: int
    mtime_ns: int


class ScanReport(msgspec.Struct):
    entries: list[Entry] = msgspec.field(default_factory=list)
    skipped: list[tuple[str, str]] = msgspec.field(default_factory=list)
    """(rel, why) for symlinks and non-regular files: never taken, reported once."""


def scan_inbox(inbox: Path, under: str = "") -> ScanReport:
    """Every candidate file below ``inbox/under``; symlinks and special files are skipped."""
    report = ScanReport()
    start = inbox / under if under else inbox
    _walk(inbox, start, report)
    return report


def _walk(inbox: Path, directory: Path, report: ScanReport) -> None:
    try:
        iterator = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        report.skipped.append((_rel(inbox, Path(directory)), f"cannot list: {exc.strerror}"))
        return
    with iterator:
        for item in iterator:
            rel = _rel(inbox, Path(item.path))
            if is_ignored(PurePosixPath(rel)):
                continue
            try:
                if item.is_symlink():
                    report.skipped.append((rel, "symlink (never followed)"))
                elif item.is_dir(follow_symlinks=False):
                    _walk(inbox, Path(item.path), report)
                elif item.is_file(follow_symlinks=False):
                    st = item.stat(follow_symlinks=False)
                    report.entries.append(Entry(rel, st.st_size, st.st_mtime_ns))
                else:
                    report.skipped.append((rel, "not a regular file"))
            except FileNotFoundError:
                continue


def _rel(inbox: Path, path: Path) -> str:
    return path.relative_to(inbox).as_posix()


class Settler(msgspec.Struct):
    """Remembers what each unsettled file looked like and since when."""

    settle_seconds: float
    _pending: dict[str, tuple[int, int, float]] = msgspec.field(default_factory=dict)

    def observe(self, entries: Iterable[Entry], *, now: float, complete: bool) -> list[Entry]:
        """Feed one scan; return the entries that have settled.

        ``complete`` says the scan covered the whole inbox, so pending files it did not see
        have vanished and are forgotten.
        """
        settled: list[Entry] = []
        seen: set[str] = set()
        for entry in entries:
            seen.add(entry.rel)
            if self._is_settled(entry, now):
                settled.append(entry)
        if complete:
            for rel in list(self._pending):
                if rel not in seen:
                    del self._pending[rel]
        return settled

    def _is_settled(self, entry: Entry, now: float) -> bool:
        age = now - entry.mtime_ns / 1e9
        previous = self._pending.get(entry.rel)
        if previous is None or previous[:2] != (entry.size, entry.mtime_ns):
            if age >= self.settle_seconds:
                self._pending.pop(entry.rel, None)
                return True
            self._pending[entry.rel] = (entry.size, entry.mtime_ns, now)
            return False
        if now - previous[2] >= self.settle_seconds or age >= self.settle_seconds:
            del self._pending[entry.rel]
            return True
        return False

    def forget(self, rel: str) -> None:
        self._pending.pop(rel, None)

    @property
    def pending(self) -> Mapping[str, tuple[int, int, float]]:
        return self._pending

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(since for _, _, since in self._pending.values()) + self.settle_seconds

    def has_pending_under(self, folder: str) -> bool:
        prefix = folder.rstrip("/") + "/"
        return any(rel.startswith(prefix) for rel in self._pending)


def is_new(entry: Entry, known: Mapping[str, KnownFile], *, keep: bool) -> bool:
    """Whether a settled file is new work.

    A file with an unfinished row is never taken twice. A finished file that is still in the
    inbox is new when inputs are archived or deleted (it was dropped again), and only when its
    size or mtime changed when inputs are kept (so unchanged files are never hashed again) or
    when it was left in the inbox because the archive could never take it.
    """
    previous = known.get(entry.rel)
    if previous is None or previous.state == "retried":
        return True
    if previous.state not in ("done", LEFT_IN_INBOX):
        return False
    if not keep and previous.state == "done":
        return True
    # kept, or left in the inbox because it could not be archived: new only once it changes
    return (previous.size, previous.mtime_ns) != (entry.size, entry.mtime_ns)


def examine(
    inbox: Path, entry: Entry, *, routes: Sequence[Route], max_file_bytes: int
) -> NewFile | None:
    """Route, check and hash one settled file; ``None`` if it vanished meanwhile."""
    rel = PurePosixPath(entry.rel)
    destination = route_file(rel, routes)
    input_type = input_type_for(rel)
    reason = _rejection(rel, entry, destination is not None, input_type, routes, max_file_bytes)
    sha256: str | None = None
    if reason is None:
        try:
            sha256 = hash_file(inbox / entry.rel)
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = f"cannot read the file: {exc.strerror or exc}"
    return NewFile(
        rel=entry.rel,
        size=entry.size,
        mtime_ns=entry.mtime_ns,
        sha256=sha256,
        input_type=input_type,
        destination=destination,
        reason=reason,
    )


def _rejection(
    rel: PurePosixPath,
    entry: Entry,
    routed: bool,
    input_type: str | None,
    routes: Sequence[Route],
    max_file_bytes: int,
) -> str | None:
    if not routed:
        if routes:
            return "no [[route]] matches this file"
        return "no workflow for this file: put it in inbox/<workflow>/"
    if input_type is None:
        suffix = rel.suffix or "(none)"
        return f"unsupported file type {suffix!r}: bem accepts " + ", ".join(_supported())
    if entry.size == 0:
        return "empty file: nothing to send"
    if entry.size > max_file_bytes:
        return f"file too large: {entry.size} bytes > inbox.max_file_bytes = {max_file_bytes}"
    return None


def _supported() -> Iterator[str]:
    return iter(sorted(f".{ext}" for ext in INPUT_TYPES))


def hash_file(path: Path) -> str:
    """sha256 of a regular file, opened without following symlinks or blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        digest = hashlib.sha256()
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_paths(inbox: Path, rels: Iterable[str]) -> ScanReport:
    """Look only at the given paths (files or folders) below the inbox."""
    report = ScanReport()
    for rel in sorted(rels):
        if not rel or rel == "." or is_ignored(PurePosixPath(rel)):
            continue
        path = inbox / rel
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISDIR(st.st_mode):
            sub = scan_inbox(inbox, rel)
            report.entries.extend(sub.entries)
            report.skipped.extend(sub.skipped)
        elif stat.S_ISREG(st.st_mode):
            report.entries.append(Entry(rel, st.st_size, st.st_mtime_ns))
        elif stat.S_ISLNK(st.st_mode):
            report.skipped.append((rel, "symlink (never followed)"))
        else:
            report.skipped.append((rel, "not a regular file"))
    # a new folder and a file inside it may both be named: each file once
    report.entries = list({entry.rel: entry for entry in report.entries}.values())
    return report


def folders_of(rel: str) -> list[str]:
    """The folders a relative path lies in, outermost first: ``a/b/c.txt`` → ``a``, ``a/b``."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]

