"""Fixtures and helpers shared by the test modules: emulators, fake clocks, TOML documents."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from runner.api import UploadFile
from runner.clock import FakeClock
from runner.emulator import Emulator, EmulatorSettings

MEMORY_TEMP_ROOT = Path("/dev/shm")
"""Where ``tmp_path`` lives when the machine has it (unless PYTEST_DEBUG_TEMPROOT says where):
in memory, every fsync the runner makes for its documents and its database is free. Nothing
here tests surviving a power cut, which only a real disk could show; a SIGKILL loses nothing
from memory either."""
TEMP_ROOT = "PYTEST_DEBUG_TEMPROOT"
if MEMORY_TEMP_ROOT.is_dir() and os.access(MEMORY_TEMP_ROOT, os.W_OK):
    os.environ.setdefault(TEMP_ROOT, str(MEMORY_TEMP_ROOT))

FAST_LATENCY = (0.01, 0.05)
"""Seconds a call takes in :func:`fast_emulator`: it finishes after a poll or two."""

settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")
"""No example fails for how long it took: on a shared, loaded machine that would be a timed
assertion (speed is the benchmarks' job). Examples, shrinking and health checks stay the default."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upload(tmp_path: Path) -> UploadFile:
    """A small text document to send."""
    path = tmp_path / "doc.txt"
    path.write_bytes(b"a document")
    return UploadFile(path, "text")


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def free_port() -> int:
    """A loopback port nobody listens on now, for a server the test is about to start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def frozen_emulator(*, frozen_at: float = 0.0, latency: float = 0.0, **settings: Any) -> Emulator:
    """An emulator whose time stands at ``frozen_at`` until the test advances it; every call
    takes exactly ``latency`` seconds of that time."""
    values: dict[str, Any] = {"latency_min": latency, "latency_max": latency}
    return Emulator(EmulatorSettings(**(values | settings)), clock=lambda: frozen_at)


def fast_emulator(**settings: Any) -> Emulator:
    """An emulator on real time whose calls finish within :data:`FAST_LATENCY`.

    On a fake clock (tests/fake_time.py) its time also moves with the runner's.
    """
    low, high = FAST_LATENCY
    values: dict[str, Any] = {"latency_min": low, "latency_max": high}
    return Emulator(EmulatorSettings(**(values | settings)))


def run_sql(url: str, sql: str) -> list[tuple[object, ...]]:
    """``sql`` run on a connection of its own, as another client would; the rows it returns."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


# -- TOML writing ----------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def toml_string(value: str) -> str:
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_document(document: Mapping[str, Any]) -> str:
    """A TOML document: top-level keys, then a table per dict and ``[[route]]`` per route."""
    lines: list[str] = []
    tables: list[str] = []
    for name, value in document.items():
        if name == "route" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for route in value:
                tables.append("[[route]]")
                tables.extend(f"{toml_string(k)} = {toml_value(v)}" for k, v in route.items())
        elif isinstance(value, dict):
            tables.append(f"[{name}]")
            tables.extend(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        else:
            lines.append(f"{name} = {toml_value(value)}")
    return "\n".join([*lines, *tables]) + "\n"
