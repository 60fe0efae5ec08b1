"""Named crash points for the crash tests.

``BEM_RUNNER_CRASH_AT=<point>[:<hit>]`` makes the process SIGKILL itself the ``hit``-th time (1 by
default) it reaches ``point``. Unset, :func:`point` is one comparison and a return.

A point may carry a ``detail`` (the SQLite store passes the name of the statement it commits):
the process then counts hits of ``<name>`` and of ``<name>.<detail>`` separately, so
``store.before_commit.mark_sending:2`` dies before the second ``mark_sending`` commit while
``store.before_commit:2`` dies before the second commit of any kind.
"""

from __future__ import annotations

import os
import signal

POINTS: tuple[str, ...] = (
    "store.before_commit",
    "store.after_commit",
    "submit.after_commit",
    "submit.before_send",
    "submit.after_receive",
    "submit.before_list",
    "submit.after_list",
    "poll.before_send",
    "poll.after_receive",
    "deliver.before_fsync",
    "deliver.after_fsync",
    "deliver.before_rename",
    "deliver.after_rename",
    "deliver.before_dir_fsync",
    "deliver.after_dir_fsync",
    "archive.before_rename",
    "archive.after_rename",
    "archive.before_fsync",
    "archive.after_fsync",
)
"""Every point the pipeline passes (store points also with ``.<statement>`` appended)."""

_target: tuple[str, int] | None = None
_hits: dict[str, int] = {}


def arm(spec: str | None) -> None:
    """Called once by the CLI with the environment's value."""
    global _target
    _hits.clear()
    if not spec:
        _target = None
        return
    name, _, hit = spec.partition(":")
    _target = (name, int(hit or "1"))


def point(name: str, detail: str | None = None) -> None:
    if _target is None:
        return
    _hit(name)
    if detail is not None:
        _hit(f"{name}.{detail}")


def _hit(name: str) -> None:
    assert _target is not None
    if _target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
