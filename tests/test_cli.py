"""The command line as a user runs it: a real subprocess, exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from runner.emulator import Emulator, EmulatorSettings, serve_emulator


def bem_runner(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BEM_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def paths(root: Path) -> list[str]:
    return [
        "--inbox",
        str(root / "inbox"),
        "--outbox",
        str(root / "outbox"),
        "--archive",
        str(root / "archive"),
        "--state",
        str(root / "state.db"),
    ]


def put(root: Path, rel: str, content: bytes) -> None:
    path = root / "inbox" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_drain_on_the_built_in_emulator(tmp_path: Path) -> None:
    put(tmp_path, "wf/a.txt", b"hello")
    put(tmp_path, "wf/b.csv", b"a,b\n1,2\n")
    done = bem_runner("drain", "--emulator", "--settle-seconds", "0", *paths(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"drained: 2 results, 0 errors → {tmp_path / 'outbox'}" in done.stdout
    assert (tmp_path / "outbox/wf/a.txt.json").exists()

    status = bem_runner("status", "--json", *paths(tmp_path))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["files"] == {"done:result": 2}


def test_drain_exits_1_when_a_file_ends_in_an_error(tmp_path: Path) -> None:
    put(tmp_path, "wf/a.txt", b"hello BEM-EMULATOR-FAIL")
    done = bem_runner("drain", "--emulator", "--settle-seconds", "0", *paths(tmp_path))
    assert done.returncode == 1, done.stderr
    assert "0 results, 1 errors" in done.stdout


def test_config_errors_exit_2_and_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[inbox]\nsettle_secs = 1\n")
    done = bem_runner("--config", str(config), "drain", *paths(tmp_path))
    assert done.returncode == 2
    assert "unknown setting 'inbox.settle_secs'" in done.stderr


def test_missing_key_exits_2(tmp_path: Path) -> None:
    done = bem_runner("drain", *paths(tmp_path))
    assert done.returncode == 2
    assert "no API key" in done.stderr


def test_a_state_file_that_is_not_a_database_exits_2(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"garbage" * 1000)
    done = bem_runner("drain", "--emulator", *paths(tmp_path))
    assert done.returncode == 2
    assert "not a bem-runner state database" in done.stderr


@pytest.mark.anyio
async def test_rejected_key_exits_3_and_keeps_the_files(tmp_path: Path) -> None:
    put(tmp_path, "wf/a.txt", b"hello")
    emulator = Emulator(EmulatorSettings(api_key="the-right-key"))
    async with serve_emulator(emulator) as base_url:
        done = await anyio.to_thread.run_sync(
            lambda: bem_runner(
                "drain",
                "--settle-seconds",
                "0",
                *paths(tmp_path),
                env={"BEM_API_KEY": "a-wrong-key", "BEM_BASE_URL": base_url},
            )
        )
    assert done.returncode == 3, done.stderr
    assert "API key" in done.stdout
    assert "a-wrong-key" not in done.stdout + done.stderr
    assert (tmp_path / "inbox/wf/a.txt").exists()
    assert not (tmp_path / "outbox/wf/a.txt.error.json").exists()


def test_unreachable_bem_exits_3(tmp_path: Path) -> None:
    put(tmp_path, "wf/a.txt", b"hello")
    config = tmp_path / "c.toml"
    config.write_text('[api]\nunreachable_timeout = "0.5s"\n')
    done = bem_runner(
        "--config",
        str(config),
        "drain",
        "--settle-seconds",
        "0",
        *paths(tmp_path),
        env={"BEM_API_KEY": "k", "BEM_BASE_URL": "http://127.0.0.1:9"},
    )
    assert done.returncode == 3, done.stderr
    assert "cannot be reached" in done.stdout
    assert (tmp_path / "inbox/wf/a.txt").exists()


def test_status_of_a_state_that_does_not_exist_is_an_error_and_creates_nothing(
    tmp_path: Path,
) -> None:
    state = tmp_path / "mistyped" / "state.db"
    done = bem_runner("status", "--state", str(state))
    assert done.returncode == 2
    assert f"{state}: no state database here" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mistyped").exists()


def test_global_options_are_taken_after_the_subcommand_too(tmp_path: Path) -> None:
    config = tmp_path / "bem-runner.toml"
    config.write_text(f'[paths]\nstate = "{tmp_path / "elsewhere.db"}"\n')
    before = bem_runner("--config", str(config), "status")
    after = bem_runner("status", "--config", str(config), "--log-level", "debug")
    for done in (before, after):
        assert done.returncode == 2
        assert f"{tmp_path / 'elsewhere.db'}: no state database here" in done.stderr
    assert "No such option" not in after.stderr


def test_an_outbox_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    put(tmp_path, "wf/a.txt", b"hello")
    (tmp_path / "outbox").write_text("not a folder")
    done = bem_runner("drain", "--emulator", "--settle-seconds", "0", *paths(tmp_path))
    assert done.returncode == 2
    assert f"paths.outbox ({tmp_path / 'outbox'}) exists and is not a folder" in done.stderr
    assert "Traceback" not in done.stderr
