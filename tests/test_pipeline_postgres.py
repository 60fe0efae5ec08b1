"""The whole pipeline on the PostgreSQL store (one owner): a drain, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec.structs
import pytest

from runner.credentials import Secret
from runner.emulator import Emulator, EmulatorSettings
from tests.pipeline import drain, make_config, outbox_documents, write_files

if TYPE_CHECKING:
    from tests.postgres import Cluster

pytest_plugins = ["tests.postgres"]


@pytest.mark.anyio
async def test_a_drain_on_the_postgresql_store_delivers_every_file_once(
    tmp_path: Path, postgres_url: str
) -> None:
    config = make_config(tmp_path)
    config = msgspec.structs.replace(config, store_url=Secret(postgres_url))
    files = [(f"wf/f{i}.txt", f"file {i}".encode()) for i in range(6)]
    files += [("wf/batch/a.txt", b"a"), ("wf/batch/b.txt", b"b")]
    write_files(config.paths.inbox, files)
    emulator = Emulator(EmulatorSettings(latency_min=0, latency_max=0))
    outcome = await drain(config, emulator)
    assert outcome.delivered == {"result": 8}
    assert sorted(outbox_documents(config.paths.outbox)) == sorted(rel for rel, _ in files)
    assert len(emulator.calls) == 7  # six single files and one batch
    assert not config.paths.state.exists()  # the SQLite state is not used


def test_drain_and_status_with_store_and_the_password_from_the_environment(
    tmp_path: Path, postgres_cluster: Cluster, postgres_schema: str
) -> None:
    url = postgres_cluster.url(schema=postgres_schema, password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEM_", "PG"))}
    env["PGPASSWORD"] = postgres_cluster.password
    (tmp_path / "inbox/wf").mkdir(parents=True)
    (tmp_path / "inbox/wf/a.txt").write_bytes(b"hello")
    paths = ["--inbox", str(tmp_path / "inbox"), "--outbox", str(tmp_path / "outbox")]
    paths += ["--archive", str(tmp_path / "archive"), "--state", str(tmp_path / "state.db")]

    def bem_runner(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runner", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    done = bem_runner("drain", "--emulator", "--settle-seconds", "0", "--store", url, *paths)
    assert done.returncode == 0, done.stderr
    status = bem_runner("status", "--json", "--store", url, *paths)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["files"] == {"done:result": 1}
    assert postgres_cluster.password not in done.stderr + status.stderr
    refused = bem_runner("status", "--store", postgres_cluster.url(schema=postgres_schema), *paths)
    assert refused.returncode == 2
    assert "holds a password" in refused.stderr
    assert postgres_cluster.password not in refused.stderr
