"""How a run of the runner ended: its exit code, and what it did."""

from __future__ import annotations

from enum import IntEnum

import msgspec

from runner.store.base import Counts


class ExitCode(IntEnum):
    OK = 0
    FILE_ERRORS = 1
    USAGE = 2
    API_UNAVAILABLE = 3
    INTERRUPTED = 4
    """A drain stopped by a signal before everything was delivered; the state is kept."""


class Outcome(msgspec.Struct):
    exit_code: ExitCode
    counts: Counts
    delivered: dict[str, int]
    """Documents this run wrote, by outcome."""
    reason: str | None = None
