"""Named crash points for the crash tests.

``BEM_RUNNER_CRASH_AT=<point>[:<hit>]`` makes the process SIGKILL itself the ``hit``-th time (1 by
default) it reaches ``point``. Unset, :func:`point` is one dictionary lookup and a return.
"""

from __future__ import annotations

import os
import signal

_target: tuple[str, int] | None = None
_hits: dict[str, int] = {}


def arm(spec: str | None) -> None:
    """Called once by the CLI with the environment's value."""
    global _target
    if not spec:
        _target = None
        return
    name, _, hit = spec.partition(":")
    _target = (name, int(hit or "1"))


def point(name: str) -> None:
    if _target is None or _target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
