"""The API key never leaves the process: not in logs, state, outbox or error documents; and what
the runner writes is private by default."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import anyio
import pytest

from runner.emulator import Emulator, EmulatorSettings, serve_emulator

from .harness import Workspace, environment

pytestmark = pytest.mark.anyio

CANARY = "sk-live-CANARY-7f3a9c1e5b"


def every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_the_key_appears_nowhere_and_outputs_are_private(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(api_key=CANARY, latency_min=0.01, latency_max=0.05))
    async with serve_emulator(emulator) as base_url:
        workspace = Workspace(tmp_path / "w", base_url)
        workspace.write_config()
        workspace.drop("wf/good.txt", b"a good document")
        workspace.drop("wf/fails.txt", b"BEM-EMULATOR-FAIL")
        workspace.drop("wf/invalid.txt", b"BEM-EMULATOR-INVALID")  # 400 with bem's message
        workspace.drop("wf/tool.exe", b"MZ")
        workspace.drop("unknown-flow/x.txt", b"404")
        environ = environment(workspace)
        environ["BEM_API_KEY"] = CANARY
        done = await anyio.run_process(
            [*_python(), "--log-level", "debug", "drain"], env=environ, check=False
        )
        status = await anyio.run_process([*_python(), "status", "--json"], env=environ)

    output = (done.stdout + done.stderr + status.stdout + status.stderr).decode()
    assert done.returncode == 1, output  # some files ended in an error, as they should
    assert "bem request" in output  # debug logging of every request was on
    assert CANARY not in output
    files = every_file(workspace.root)
    assert {p.name for p in files} >= {"state.db", "good.txt.json", "fails.txt.error.json"}
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), path
    for path in every_file(workspace.outbox) + every_file(workspace.archive):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def _python() -> list[str]:
    return [sys.executable, "-m", "runner"]
