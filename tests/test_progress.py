"""The drain's progress display on a (forced) terminal, driven by explicit counts and time."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.progress import ERASE_LINE, DrainProgress, Tally
from runner.store.base import Counts


class Terminal(io.StringIO):
    """What the bar writes, as if to a terminal."""

    def isatty(self) -> bool:
        return True


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
    terminal = Terminal()
    clock = Clock()
    with DrainProgress(terminal, get_time=clock, get_width=lambda: 160) as progress:
        await progress.update(counts({"queued": 10}, {"ready": 10}))
        clock.now += 10
        await progress.update(
            counts(
                {"queued": 6, "done:result": 3, "done:error": 1},
                {"polling": 2, "done": 4, "ready": 4},
            )
        )
    last_line = terminal.getvalue().split("\r")[-1]
    assert "draining" in last_line
    assert "submitted 6  completed 3  failed 1" in last_line
    assert "4/10" in last_line
    assert "0.4 files/s" in last_line
    assert "ETA 0:00:15" in last_line
    assert terminal.getvalue().endswith("\n")


@pytest.mark.anyio
async def test_more_files_after_all_finished_show_the_new_total() -> None:
    terminal = Terminal()
    clock = Clock()
    with DrainProgress(terminal, get_time=clock, get_width=lambda: 160) as progress:
        await progress.update(counts({"queued": 4}, {"ready": 4}))
        clock.now += 4
        await progress.update(counts({"done:result": 4}, {"done": 4}))
        await progress.update(counts({"done:result": 4, "queued": 2}, {"done": 4, "ready": 2}))
    last_line = terminal.getvalue().split("\r")[-1]
    assert "4/6" in last_line
    assert "1.0 files/s  ETA 0:00:02" in last_line


@pytest.mark.anyio
async def test_log_lines_go_above_the_progress_line_and_it_fits_the_terminal() -> None:
    terminal = Terminal()
    stderr = sys.stderr
    with DrainProgress(terminal, get_time=Clock(), get_width=lambda: 40) as progress:
        await progress.update(counts({"queued": 2}, {"ready": 2}))
        print("file submitted", file=sys.stderr)  # print writes the newline apart
        sys.stderr.write("call finished\nfile deliv")
        sys.stderr.write("ered\n")
    assert sys.stderr is stderr
    screen = terminal.getvalue().replace(ERASE_LINE, "\r").split("\r")
    shown = [part for part in screen if part]
    line = "draining [" + "-" * 29  # 39 columns: one short of the terminal's width
    assert shown == [
        line,
        "file submitted\n",
        line,
        "call finished\n",
        line,
        "file delivered\n",
        line + "\n",
    ]


@pytest.mark.anyio
async def test_log_lines_from_threads_stay_whole() -> None:
    terminal = Terminal()
    with DrainProgress(terminal, get_time=Clock(), get_width=lambda: 200) as progress:

        def log(worker: int) -> None:
            for n in range(300):
                print(f"worker {worker} line {n}", file=sys.stderr)

        workers = [threading.Thread(target=log, args=(worker,)) for worker in range(2)]
        for thread in workers:
            thread.start()
        for n in range(300):
            await progress.update(counts({"queued": 300 - n, "done:result": n}, {}))
        for thread in workers:
            thread.join()
    logged = [line for line in terminal.getvalue().split(ERASE_LINE) if line.startswith("w")]
    assert sorted(logged) == sorted(
        f"worker {worker} line {n}\n" for worker in range(2) for n in range(300)
    )


# Any character but a lone surrogate, control characters included; ESC is left out only so that
# the erase sequences can be told apart from the text.
LOGGED = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x1b"), max_size=40)


@given(st.lists(LOGGED, max_size=12))
def test_whatever_is_logged_goes_above_the_line_in_whole_lines(pieces: list[str]) -> None:
    """Any text, written in any pieces (control characters, carriage returns, no final newline
    included): each line it holds is written once, whole and in order, above the progress line."""
    terminal = Terminal()
    with DrainProgress(terminal, get_time=Clock(), get_width=lambda: 80):
        for piece in pieces:
            sys.stderr.write(piece)
    text = "".join(pieces)
    above = [segment for segment in terminal.getvalue().split(ERASE_LINE) if segment]
    assert "".join(above) == (text if not text or text.endswith("\n") else text + "\n")
    assert all(segment.endswith("\n") for segment in above)  # never part of a line


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
