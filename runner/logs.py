"""Logging: structlog JSON lines when stderr is not a terminal (journald), readable otherwise.

One line per state change of a file or call, each carrying ``file``, ``callID`` and
``callReferenceID`` where they are known; per-request and per-poll detail is DEBUG only.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

from runner.names import shown

LEVELS = ("debug", "info", "warning", "error")


def show_names(_logger: object, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Every string in a log line as valid Unicode: a file name that is not UTF-8 is shown
    with its odd bytes as ``\\xNN`` (:func:`runner.names.shown`), never a lone surrogate."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = shown(value)
    return event


class _Stderr:
    """Whatever ``sys.stderr`` is at the moment of writing: while the drain's progress line is
    shown, it stands in for the terminal and puts each log line above the line, not through it
    (:mod:`runner.progress`)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _LineWriter:
    """structlog's logger: each rendered line goes out in one write (``print`` makes two, the
    line and its newline, each a system call on an unbuffered stderr)."""

    def __init__(self, out: TextIO | _Stderr) -> None:
        self._out = out
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._out.write(message + "\n")
            self._out.flush()

    debug = info = warning = warn = error = err = critical = exception = fatal = failure = msg


def configure_logging(
    level: str = "info", *, json_lines: bool | None = None, stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (stderr): JSON unless it is a terminal or ``json_lines`` says so."""
    import structlog  # here, not at the top: `bem-runner --help` never configures logging

    out = stream if stream is not None else _Stderr()
    terminal = out.isatty()
    if json_lines is None:
        json_lines = not terminal
    renderer: Any
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        show_names,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=terminal)
    # The runner says once that its store cannot be reached; the connection pool would say so
    # again at every attempt to reconnect.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    writer = _LineWriter(out)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )
