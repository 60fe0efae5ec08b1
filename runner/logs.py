"""Logging: structlog JSON lines when stderr is not a terminal (journald), readable otherwise.

One line per state change of a file or call, each carrying ``file``, ``callID`` and
``callReferenceID`` where they are known; per-request and per-poll detail is DEBUG only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    level: str = "info", *, json_lines: bool | None = None, stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (stderr): JSON unless it is a terminal or ``json_lines`` says so."""
    stream = stream if stream is not None else sys.stderr
    terminal = stream.isatty()
    if json_lines is None:
        json_lines = not terminal
    renderer: Any
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=terminal)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
