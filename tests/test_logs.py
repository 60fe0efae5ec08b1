"""Logs: one structured event per state change, each naming its file and call."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from runner.emulator import Emulator, EmulatorSettings
from runner.logs import configure_logging
from tests.pipeline import drain, make_config, write_files

STATE_CHANGES = {
    "runner started",
    "file queued",
    "batch closed",
    "call submitted",
    "call finished",
    "file delivered",
    "stopping: no new files taken, finishing in-flight requests",
    "runner stopped",
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    structlog.get_logger("t").info("file queued", file="wf/a.txt")
    structlog.get_logger("t").debug("bem request", route="/v3/calls")
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "file queued"
    assert event["file"] == "wf/a.txt"
    assert event["level"] == "info"
    assert "timestamp" in event


@pytest.mark.usefixtures("restore_logging")
def test_readable_console_on_a_terminal_and_debug_on_request() -> None:
    stream = Terminal()
    configure_logging("debug", stream=stream)
    structlog.get_logger("t").debug("bem request", route="/v3/calls")
    text = stream.getvalue()
    assert "bem request" in text
    assert not text.lstrip().startswith("{")


@pytest.mark.anyio
async def test_every_event_about_a_call_or_file_names_it(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0.05, latency_max=0.05))
    config = make_config(tmp_path)
    write_files(
        config.paths.inbox,
        [("wf/a.txt", b"a"), ("wf/b.txt", b"b"), ("wf/c.txt", b"BEM-EMULATOR-FAIL")],
    )
    with capture_logs() as logs:
        outcome = await drain(config, emulator)
    assert outcome.delivered == {"result": 2, "error": 1}
    info = [e for e in logs if e["log_level"] == "info"]
    assert {e["event"] for e in info} <= STATE_CHANGES, "INFO is for state changes only"
    for event in info:
        if event["event"] in ("file queued", "file delivered"):
            assert event["file"]
        if event["event"] in ("call submitted", "call finished", "file delivered"):
            assert event["callID"]
            assert event["callReferenceID"]
    # one line per state change: polling a call several times adds nothing at INFO
    per_thing = Counter((e["event"], e.get("file"), e.get("callReferenceID")) for e in info)
    assert max(per_thing.values()) == 1
    delivered = [e for e in info if e["event"] == "file delivered"]
    assert sorted(e["file"] for e in delivered) == ["wf/a.txt", "wf/b.txt", "wf/c.txt"]


class CountedWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("json_lines", [True, False])
def test_each_line_goes_out_in_one_write(json_lines: bool) -> None:
    # On an unbuffered stderr every write is a system call: a line and its newline are one.
    stream = CountedWrites()
    configure_logging("info", json_lines=json_lines, stream=stream)
    structlog.get_logger("t").info("file queued", file="wf/a.txt")
    structlog.get_logger("t").warning("file rejected", file="wf/b.txt", reason="empty")
    assert len(stream.writes) == 2
    assert all(write.endswith("\n") and write.count("\n") == 1 for write in stream.writes)
    assert "wf/a.txt" in stream.writes[0]
    assert "wf/b.txt" in stream.writes[1]
