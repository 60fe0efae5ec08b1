"""Crash harness: the runner as a real process (``python -m runner``) against an emulator served
by the test process, killed with SIGKILL and restarted, and the checks that must hold after.

Everything here works on real files, a real SQLite database and real HTTP.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from runner.emulator import Emulator

from .conftest import toml_document
from .pipeline import leftover_temporaries, outbox_documents

API_KEY = "crash-harness-key"
PROCESS_TIMEOUT = 120.0
"""No single runner process in these tests may live longer (a hang is a failure, not a wait)."""

KILLED = -signal.SIGKILL


@dataclass
class Workspace:
    """One runner's world: folders, state, config file and the log of every process it ran."""

    root: Path
    base_url: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: dict[str, bytes] = field(default_factory=dict)
    """Every input file the test dropped: rel → content."""
    runs: int = 0

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def state(self) -> Path:
        return self.root / "state.db"

    @property
    def log(self) -> Path:
        return self.root / "runner.log"

    @property
    def config_file(self) -> Path:
        return self.root / "bem-runner.toml"

    def write_config(self) -> None:
        sections: dict[str, dict[str, Any]] = {
            "paths": {
                "inbox": str(self.inbox),
                "outbox": str(self.outbox),
                "archive": str(self.archive),
                "state": str(self.state),
            },
            "api": {"base_url": self.base_url, "visibility_window": "1s", "timeout_seconds": 10},
            "inbox": {"settle_seconds": 0, "rescan_seconds": 0.5},
            "poll": {"initial_seconds": 0.05, "max_seconds": 0.3},
            "limits": {"requests_per_second": 200, "burst": 50},
        }
        for name, values in self.settings.items():
            sections.setdefault(name, {}).update(values)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(toml_document(sections))

    def drop(self, rel: str, content: bytes) -> None:
        """Put a file into the inbox atomically (hidden temporary, then rename)."""
        assert rel not in self.written, rel
        path = self.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.incoming"
        temporary.write_bytes(content)
        os.replace(temporary, path)
        self.written[rel] = content


def unique_files(rng: random.Random, start: int, count: int) -> list[tuple[str, bytes]]:
    """Files with unique content: loose files in two workflows and a few batch folders."""
    files = []
    for n in range(start, start + count):
        ext = ("txt", "pdf", "csv", "json", "png")[n % 5]
        if n % 6 == 0:
            rel = f"wf-batch/folder-{n // 6 % 4}-{start}/item-{n}.{ext}"
        else:
            rel = f"wf-{n % 2}/file-{n}.{ext}"
        files.append((rel, f"unique document {n} {rng.getrandbits(64):016x}\n".encode()))
    return files


def environment(workspace: Workspace, *, crash_at: str | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BEM_")}
    environ["BEM_API_KEY"] = API_KEY
    environ["BEM_RUNNER_CONFIG"] = str(workspace.config_file)
    if crash_at:
        environ["BEM_RUNNER_CRASH_AT"] = crash_at
    return environ


async def start(workspace: Workspace, *args: str, crash_at: str | None = None) -> anyio.abc.Process:
    """Start ``python -m runner <args>``; its output is appended to the workspace log."""
    workspace.runs += 1
    with workspace.log.open("ab") as log:
        log.write(f"--- run {workspace.runs}: {' '.join(args)} crash_at={crash_at}\n".encode())
        return await anyio.open_process(
            [sys.executable, "-m", "runner", *args],
            stdin=None,
            stdout=log,
            stderr=log,
            env=environment(workspace, crash_at=crash_at),
        )


async def finish(process: anyio.abc.Process) -> int:
    with anyio.fail_after(PROCESS_TIMEOUT):
        return await process.wait()


async def run(workspace: Workspace, *args: str, crash_at: str | None = None) -> int:
    """Run ``python -m runner <args>`` to its end (or its crash); the exit code (-9: killed)."""
    return await finish(await start(workspace, *args, crash_at=crash_at))


async def kill_after(process: anyio.abc.Process, seconds: float) -> int:
    """SIGKILL the process after ``seconds`` (unless it ended by itself); its exit code."""
    with anyio.move_on_after(seconds):
        return await process.wait()
    process.send_signal(signal.SIGKILL)
    return await finish(process)


async def status_json(workspace: Workspace) -> dict[str, Any]:
    result = await anyio.run_process(
        [sys.executable, "-m", "runner", "status", "--json"],
        env=environment(workspace),
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def integrity_check(state: Path) -> str:
    """``PRAGMA integrity_check`` on the state database, as a separate reader would see it."""
    connection = sqlite3.connect(state)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def check_invariants(
    workspace: Workspace, emulator: Emulator, report: dict[str, Any]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Nothing lost, nothing sent twice, nothing half-written, and the store agrees."""
    documents = outbox_documents(workspace.outbox)
    assert sorted(documents) == sorted(workspace.written), "every input has exactly one document"
    for rel, (_, document) in documents.items():
        assert document["file"] == rel
    stats = emulator.stats()
    duplicated = {ref: n for ref, n in stats["calls_by_reference"].items() if n != 1}
    assert duplicated == {}, "one call per callReferenceID"
    twice = {sha: n for sha, n in stats["files_by_content_sha256"].items() if n != 1}
    assert twice == {}, "no file inside two calls"
    assert leftover_temporaries(workspace.outbox) == []
    assert not [p for p in workspace.inbox.rglob("*") if p.is_file()], "inbox is empty"
    archived = sorted(
        p.relative_to(workspace.archive).as_posix()
        for p in workspace.archive.rglob("*")
        if p.is_file()
    )
    assert archived == sorted(workspace.written)
    kinds = [kind for kind, _ in documents.values()]
    assert report["files"] == {f"done:{kind}": kinds.count(kind) for kind in sorted(set(kinds))}, (
        "status --json agrees with the outbox"
    )
    assert report["open_calls"] == 0
    assert integrity_check(workspace.state) == "ok"
    return documents
