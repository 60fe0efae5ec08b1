"""One owner per state: a second process on the same state is refused at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import StateInUseError, StoreError


@contextmanager
def state_owner(path: Path) -> Iterator[None]:
    """Own the state at ``path`` for as long as the block runs; refuse if another process does.

    The lock is an ``flock`` on ``<state>.lock``: the kernel drops it when its holder exits,
    however it exits, so a SIGKILL leaves no stale lock. The file holds the owner's pid, for the
    message a second process gets.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StoreError(f"{path}: cannot lock the state: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise StateInUseError(f"state {path} is in use by pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
