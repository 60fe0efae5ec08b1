"""The drain's progress display on a (forced) terminal, driven by explicit counts and time."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from runner.progress import DrainProgress, Tally
from runner.store.base import Counts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counts(files: dict[str, int], groups: dict[str, int]) -> Counts:
    return Counts(files=files, calls=groups, open_calls=groups.get("polling", 0))


def test_tally_counts_this_drain_only() -> None:
    before = Tally.of(counts({"done:result": 5, "queued": 4}, {"done": 5, "ready": 4}))
    later = Tally.of(
        counts(
            {"done:result": 7, "done:error": 1, "queued": 1},
            {"done": 8, "polling": 1},
        )
    )
    assert later.since(before) == Tally(total=4, completed=2, failed=1, submitted=4)


@pytest.mark.anyio
async def test_progress_shows_submitted_completed_failed_rate_and_eta() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    clock = Clock()
    with DrainProgress(console, get_time=clock) as progress:
        await progress.update(counts({"queued": 10}, {"ready": 10}))
        clock.now += 10
        await progress.update(
            counts(
                {"queued": 6, "done:result": 3, "done:error": 1},
                {"polling": 2, "done": 4, "ready": 4},
            )
        )
    text = console.export_text()
    assert "submitted 6  completed 3  failed 1" in text
    assert "4/10" in text
    assert "0.4 files/s" in text
    assert "ETA 0:00:15" in text


def test_quiet_when_not_a_terminal(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox" / "wf"
    inbox.mkdir(parents=True)
    (inbox / "a.txt").write_text("hello")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEM_", "NOTIFY_"))}
    done = subprocess.run(
        [sys.executable, "-m", "runner", "drain", "--emulator", "--settle-seconds", "0"]
        + [f"--{name}={tmp_path / name}" for name in ("inbox", "outbox", "archive")]
        + [f"--state={tmp_path / 'state.db'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "draining" not in done.stderr
    assert "files/s" not in done.stderr + done.stdout
