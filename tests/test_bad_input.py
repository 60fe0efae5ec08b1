"""Bad input: each case gets a clear error document or log line, nothing is lost and nothing
else is disturbed.

Covered elsewhere and not repeated here: empty, unsupported and oversized files, a file outside
any workflow folder, 400 and 404 from bem (tests/test_pipeline.py); unknown and ill-typed config
keys, a state file that is not a database, 401 in a drain (tests/test_cli.py, test_config.py,
test_store.py).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import msgspec.structs
import pytest
from structlog.testing import capture_logs

from runner.archive import finish_input
from runner.credentials import Secret
from runner.daemon import ExitCode
from runner.emulator import Emulator, EmulatorSettings
from runner.health import AUTH_RETRY_SECONDS

from .conftest import fast_emulator
from .pipeline import (
    drain,
    leftover_temporaries,
    make_config,
    outbox_documents,
    running,
    write_files,
)

pytestmark = pytest.mark.anyio


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_states(state: Path) -> dict[str, str]:
    connection = sqlite3.connect(state)
    try:
        rows = connection.execute("SELECT rel, state FROM files WHERE state <> 'retried'")
        return {os.fsdecode(rel): state for rel, state in rows.fetchall()}  # rel is bytes
    finally:
        connection.close()


async def test_fifo_socket_and_outside_symlink_are_skipped_loudly(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [("wf/good.txt", b"good")])
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside the inbox")
    (config.paths.inbox / "wf/link.txt").symlink_to(secret)
    os.mkfifo(config.paths.inbox / "wf/pipe.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(config.paths.inbox / "wf/sock.txt"))
    try:
        with capture_logs() as logs, anyio.fail_after(30):  # a FIFO must not hang the watcher
            outcome = await drain(config, emulator)
    finally:
        sock.close()

    assert outcome.exit_code == ExitCode.OK
    assert set(outbox_documents(config.paths.outbox)) == {"wf/good.txt"}
    skipped = {e["file"]: e["reason"] for e in logs if e["event"] == "file skipped"}
    assert skipped == {
        "wf/link.txt": "symlink (never followed)",
        "wf/pipe.txt": "not a regular file",
        "wf/sock.txt": "not a regular file",
    }
    assert secret.read_bytes() == b"outside the inbox"
    assert (config.paths.inbox / "wf/link.txt").is_symlink()
    assert list(emulator.stats()["files_by_content_sha256"]) == [sha256(b"good")]


async def test_odd_names_travel_unharmed(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path)
    names = [
        "wf/with spaces.txt",
        "wf/ünïcødé-文件.txt",
        "wf/new\nline.txt",
        "wf/-leading-dash.txt",
        "wf/--help.txt",
        "wf/batch folder/-item one.csv",
    ]
    write_files(config.paths.inbox, [(n, f"content of {n!r}".encode()) for n in names])

    outcome = await drain(config, emulator)

    assert outcome.exit_code == ExitCode.OK
    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == sorted(names)
    assert all(doc["file"] == rel and kind == "result" for rel, (kind, doc) in documents.items())
    assert documents["wf/batch folder/-item one.csv"][1]["itemReferenceID"] == "-item one.csv"
    assert sorted(
        p.relative_to(config.paths.archive).as_posix()
        for p in config.paths.archive.rglob("*")
        if p.is_file()
    ) == sorted(names)


async def test_batch_folder_with_unsupported_items_sends_only_the_good_ones(
    tmp_path: Path,
) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path)
    write_files(
        config.paths.inbox,
        [
            ("wf/box/a.txt", b"alpha"),
            ("wf/box/b.exe", b"MZ"),
            ("wf/box/c.pdf", b"%PDF gamma"),
            ("wf/box/empty.csv", b""),
        ],
    )

    await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    kinds = {rel: kind for rel, (kind, _) in documents.items()}
    assert kinds == {
        "wf/box/a.txt": "result",
        "wf/box/b.exe": "error",
        "wf/box/c.pdf": "result",
        "wf/box/empty.csv": "error",
    }
    assert "unsupported file type '.exe'" in documents["wf/box/b.exe"][1]["reason"]
    assert "empty" in documents["wf/box/empty.csv"][1]["reason"]
    stats = emulator.stats()
    assert stats["calls_total"] == 1
    assert sorted(stats["files_by_content_sha256"]) == sorted(
        [sha256(b"alpha"), sha256(b"%PDF gamma")]
    )


async def test_a_growing_file_is_taken_only_once_it_settles(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, inbox={"settle_seconds": 0.6, "rescan_seconds": 0.1})
    path = config.paths.inbox / "wf/growing.txt"
    path.parent.mkdir(parents=True)
    final = b""
    async with running(config, emulator) as run:
        for line in range(12):  # appended far more often than the settle time
            final += f"line {line}\n".encode()
            with path.open("ab") as fh:
                fh.write(f"line {line}\n".encode())
            written_at = int(run.clock.wall() * 1e9)  # written now, in the runner's time
            os.utime(path, ns=(written_at, written_at))
            await run.clock.sleep(0.1)
        await run.until(
            lambda: (
                (config.paths.outbox / "wf/growing.txt.json").exists()
                and (config.paths.archive / "wf/growing.txt").exists()
            )
        )

    kind, document = outbox_documents(config.paths.outbox)["wf/growing.txt"]
    assert kind == "result"
    assert document["sha256"] == sha256(final)  # the whole file, not a prefix
    assert (config.paths.archive / "wf/growing.txt").read_bytes() == final
    assert list(emulator.stats()["files_by_content_sha256"]) == [sha256(final)]


async def test_files_deleted_or_replaced_after_they_were_queued(tmp_path: Path) -> None:
    emulator = fast_emulator()
    # a window group stays open for a while: the files are queued but not yet sent
    config = make_config(
        tmp_path,
        inbox={"rescan_seconds": 0.1},
        route={
            "list": [
                {"glob": "**", "workflow": "wf", "group": "window", "batch_window_seconds": 1.0}
            ]
        },
    )
    write_files(config.paths.inbox, [("a.txt", b"will vanish"), ("b.txt", b"first version")])
    async with running(config, emulator) as run:
        await run.until(
            lambda: (
                config.paths.state.exists()
                and file_states(config.paths.state) == {"a.txt": "queued", "b.txt": "queued"}
            ),
            within=0.5,  # the window is still open
        )
        (config.paths.inbox / "a.txt").unlink()
        (config.paths.inbox / "b.txt").write_bytes(b"second, longer version")
        await run.until(lambda: len(outbox_documents(config.paths.outbox)) == 2)

    documents = outbox_documents(config.paths.outbox)
    assert documents["a.txt"][0] == "error"
    assert "vanished" in documents["a.txt"][1]["reason"]
    assert documents["b.txt"][0] == "result"
    assert documents["b.txt"][1]["sha256"] == sha256(b"second, longer version")
    assert list(emulator.stats()["files_by_content_sha256"]) == [sha256(b"second, longer version")]


async def test_a_file_replaced_while_its_call_runs_is_not_archived_unseen(tmp_path: Path) -> None:
    """The first version's result is delivered; the second version stays in the inbox and is
    sent in its own call — it is never archived (or deleted) without being processed."""
    emulator = Emulator(EmulatorSettings(latency_min=5, latency_max=5), clock=lambda: 0.0)
    config = make_config(tmp_path, inbox={"rescan_seconds": 0.1})
    write_files(config.paths.inbox, [("wf/doc.txt", b"version one")])
    async with running(config, emulator, emulator_follows=False) as run:
        await run.until(lambda: emulator.stats()["calls_total"] == 1)
        (config.paths.inbox / "wf/doc.txt").write_bytes(b"version two, replaced")
        emulator.advance(10)  # the first call finishes
        await run.until(lambda: emulator.stats()["calls_total"] == 2)
        emulator.advance(10)  # and the second
        await run.until(
            lambda: (
                (config.paths.outbox / "wf/doc.txt.json").exists()
                and outbox_documents(config.paths.outbox)["wf/doc.txt"][1]["sha256"]
                == sha256(b"version two, replaced")
                and not (config.paths.inbox / "wf/doc.txt").exists()
            )
        )

    assert (config.paths.archive / "wf/doc.txt").read_bytes() == b"version two, replaced"
    assert sorted(emulator.stats()["files_by_content_sha256"]) == sorted(
        [sha256(b"version one"), sha256(b"version two, replaced")]
    )


def test_finish_input_leaves_a_replaced_file_alone(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    write_files(inbox, [("wf/a.txt", b"new content")])
    st = (inbox / "wf/a.txt").stat()
    for on_done in ("archive", "delete"):
        finish_input(inbox, archive, "wf/a.txt", on_done, taken=(3, st.st_mtime_ns))
        assert (inbox / "wf/a.txt").read_bytes() == b"new content"
    finish_input(inbox, archive, "wf/a.txt", "archive", taken=(st.st_size, st.st_mtime_ns))
    assert (archive / "wf/a.txt").read_bytes() == b"new content"


async def test_a_rejected_key_stops_sending_and_fails_no_file(tmp_path: Path) -> None:
    emulator = fast_emulator(api_key="the-right-key")
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [(f"wf/{n}.txt", b"doc %d" % n) for n in range(5)])
    # make_config's key is not the emulator's
    with capture_logs() as logs:
        async with running(config, emulator) as run:
            await run.until(lambda: any(e["event"].startswith("bem rejected") for e in logs))
            # half a minute of opportunity to send more: a rejected key is probed once a minute
            await run.clock.sleep(AUTH_RETRY_SECONDS / 2)

    unauthorized = emulator.stats()["requests"]["POST /v3/workflows/{workflowName}/call"]
    assert unauthorized == {"401": 1}
    assert [e["log_level"] for e in logs if e["event"].startswith("bem rejected")] == ["error"]
    assert set(file_states(config.paths.state).values()) == {"queued"}
    assert outbox_documents(config.paths.outbox) == {}

    fixed = msgspec.structs.replace(config, api_key=Secret("the-right-key"))
    outcome = await drain(fixed, emulator)

    assert outcome.exit_code == ExitCode.OK
    assert len(outbox_documents(config.paths.outbox)) == 5


async def test_an_unwritable_outbox_is_retried_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, inbox={"rescan_seconds": 0.1})
    write_files(config.paths.inbox, [("wf/a.txt", b"alpha"), ("wf/b.exe", b"rejected")])
    # a full disk: no document can be written until space is freed (a folder or a file in the
    # way can never succeed, and goes elsewhere: tests/test_outbox.py)
    disk_full = True
    real_replace = os.replace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if disk_full and str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with capture_logs() as logs:
        async with running(config, emulator) as run:
            await run.until(
                lambda: (
                    {e["file"] for e in logs if e["event"].startswith("cannot write")}
                    == {"wf/a.txt", "wf/b.exe"}
                )
            )
            assert (config.paths.inbox / "wf/a.txt").exists()  # not archived, not lost
            disk_full = False
            write_files(config.paths.inbox, [("wf/c.txt", b"gamma")])  # new work wakes it
            await run.until(lambda: len(outbox_documents(config.paths.outbox)) == 3)

    kinds = {rel: kind for rel, (kind, _) in outbox_documents(config.paths.outbox).items()}
    assert kinds == {"wf/a.txt": "result", "wf/b.exe": "error", "wf/c.txt": "result"}
    assert leftover_temporaries(config.paths.outbox) == []
    assert all(n == 1 for n in emulator.stats()["calls_by_reference"].values())
