"""End to end: inbox → emulator → outbox, with real SQLite and real files."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner.daemon import ExitCode
from runner.emulator import Emulator, EmulatorSettings
from runner.retry import requeue_failed
from runner.status import collect_status
from runner.store.sqlite import open_sqlite_store

from .conftest import fast_emulator
from .pipeline import (
    drain,
    drain_through,
    leftover_temporaries,
    make_config,
    outbox_documents,
    running,
    write_files,
)

pytestmark = pytest.mark.anyio

TYPES = ["txt", "pdf", "csv", "json", "png", "eml", "html", "xlsx", "docx", "jpg"]


def mixed_inbox(inbox: Path, count: int, seed: int = 1) -> tuple[list[str], set[str]]:
    """Loose files in several workflows and some batch folders; returns (all files, failing)."""
    rng = random.Random(seed)
    files: list[tuple[str, bytes]] = []
    failing: set[str] = set()
    for n in range(count):
        ext = TYPES[n % len(TYPES)]
        workflow = f"wf-{n % 3}"
        if n % 7 == 0:
            rel = f"{workflow}/batch-{n % 5}/item-{n}.{ext}"
        else:
            rel = f"{workflow}/file-{n}.{ext}"
        content = f"document {n} {rng.random()}".encode()
        if n % 23 == 0:
            content += b" BEM-EMULATOR-FAIL"
            failing.add(rel)
        files.append((rel, content))
    return write_files(inbox, files), failing


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_every_file_gets_exactly_one_document(tmp_path: Path, version: str) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, api={"version": version})
    rels, failing = mixed_inbox(config.paths.inbox, 240)

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == sorted(rels)
    assert {rel for rel, (kind, _) in documents.items() if kind == "error"} == failing
    assert outcome.exit_code == ExitCode.FILE_ERRORS
    assert outcome.delivered == {"result": len(rels) - len(failing), "error": len(failing)}
    stats = emulator.stats()
    assert all(n == 1 for n in stats["calls_by_reference"].values())
    assert all(n == 1 for n in stats["files_by_content_sha256"].values())
    assert not leftover_temporaries(config.paths.outbox)
    # every input was archived under its own path, the inbox holds no files
    assert sorted(
        p.relative_to(config.paths.archive).as_posix()
        for p in config.paths.archive.rglob("*")
        if p.is_file()
    ) == sorted(rels)
    assert not [p for p in config.paths.inbox.rglob("*") if p.is_file()]


class AddedLater:
    """The emulator as a bem that has since added a call field, an event field and an event
    type the runner does not know."""

    def __init__(self, emulator: Emulator) -> None:
        self._inner = httpx.ASGITransport(app=emulator.app)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        body = await response.aread()
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        if request.method != "GET" or response.status_code != 200:
            return httpx.Response(response.status_code, headers=headers, content=body)
        document: dict[str, Any] = json.loads(body)
        for call in document.get("calls") or [document.get("call") or {}]:
            call["addedLater"] = {"kept": True}
            for output in call.get("outputs") or []:
                output.update(eventType="summarize", summary="one line")
        return httpx.Response(response.status_code, headers=headers, json=document)


async def test_what_bem_adds_reaches_the_stored_call_and_the_documents(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [("wf/a.txt", b"a")])
    server = AddedLater(fast_emulator(latency_min=0, latency_max=0))

    outcome = await drain_through(config, server.handle)

    assert outcome.exit_code == ExitCode.OK
    connection = sqlite3.connect(config.paths.state)
    try:
        [(stored,)] = connection.execute("SELECT result_json FROM calls").fetchall()
    finally:
        connection.close()
    assert json.loads(stored)["addedLater"] == {"kept": True}
    kind, document = outbox_documents(config.paths.outbox)["wf/a.txt"]
    assert kind == "result"
    [output] = document["outputs"]
    assert (output["eventType"], output["summary"]) == ("summarize", "one line")


async def test_batch_folder_is_one_call_split_per_item(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path)
    write_files(
        config.paths.inbox,
        [
            ("invoices/march/a.txt", b"alpha"),
            ("invoices/march/sub/b.txt", b"beta"),
            ("invoices/march/c.txt", b"gamma BEM-EMULATOR-FAIL"),
        ],
    )

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert {rel: kind for rel, (kind, _) in documents.items()} == {
        "invoices/march/a.txt": "result",
        "invoices/march/sub/b.txt": "result",
        "invoices/march/c.txt": "error",
    }
    call_ids = {doc["callID"] for _, doc in documents.values()}
    assert len(call_ids) == 1
    _, doc = documents["invoices/march/sub/b.txt"]
    assert doc["itemReferenceID"] == "sub/b.txt"
    assert [o["referenceID"] for o in doc["outputs"]] == ["sub/b.txt"]
    _, error = documents["invoices/march/c.txt"]
    assert error["reason"]
    assert error["errors"][0]["referenceID"] == "c.txt"
    assert outcome.exit_code == ExitCode.FILE_ERRORS


async def test_a_folder_taken_over_several_pages_is_still_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.watch.TAKE_PAGE", 2)
    emulator = fast_emulator()
    config = make_config(tmp_path)
    rels = write_files(
        config.paths.inbox,
        [(f"invoices/march/{n}.txt", f"item {n}".encode()) for n in range(7)]
        + [("invoices/march/.ready", b"")],
    )

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == sorted(r for r in rels if not r.endswith(".ready"))
    assert len({doc["callID"] for _, doc in documents.values()}) == 1
    assert emulator.stats()["calls_total"] == 1
    assert outcome.exit_code == ExitCode.OK


async def test_bad_input_gets_an_error_document_and_is_never_sent(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, inbox={"max_file_bytes": 100})
    write_files(
        config.paths.inbox,
        [
            ("wf/empty.txt", b""),
            ("wf/program.exe", b"MZ..."),
            ("wf/huge.txt", b"x" * 101),
            ("loose.txt", b"no workflow folder"),
            ("wf/good.txt", b"fine"),
            ("wf/.hidden.txt", b"never taken"),
            ("wf/partial.pdf.part", b"never taken"),
            ("unknown-workflow/x.txt", b"404 from bem"),
            ("wf/invalid.txt", b"BEM-EMULATOR-INVALID"),
        ],
    )

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    reasons = {rel: doc["reason"] for rel, (kind, doc) in documents.items() if kind == "error"}
    assert set(documents) == {
        "wf/empty.txt",
        "wf/program.exe",
        "wf/huge.txt",
        "loose.txt",
        "wf/good.txt",
        "unknown-workflow/x.txt",
        "wf/invalid.txt",
    }
    assert "empty" in reasons["wf/empty.txt"]
    assert "unsupported file type '.exe'" in reasons["wf/program.exe"]
    assert "too large" in reasons["wf/huge.txt"]
    assert "workflow" in reasons["loose.txt"]
    assert "bem rejected the call" in reasons["unknown-workflow/x.txt"]
    assert "bem rejected the call" in reasons["wf/invalid.txt"]
    assert documents["wf/good.txt"][0] == "result"
    # hidden and partial files are left alone
    assert (config.paths.inbox / "wf/.hidden.txt").exists()
    assert (config.paths.inbox / "wf/partial.pdf.part").exists()
    assert outcome.exit_code == ExitCode.FILE_ERRORS
    posts = {
        route: counts
        for route, counts in emulator.stats()["requests"].items()
        if route.startswith("POST")
    }
    # only the good file, the unknown workflow and the invalid one reached bem
    assert sum(sum(c.values()) for c in posts.values()) == 3


async def test_rate_limit_equal_to_the_configured_one_causes_no_429(tmp_path: Path) -> None:
    emulator = fast_emulator(rate_limit_rps=25, rate_limit_burst=4)
    config = make_config(tmp_path, limits={"requests_per_second": 25, "burst": 4})
    rels, _ = mixed_inbox(config.paths.inbox, 40)

    await drain(config, emulator)

    assert len(outbox_documents(config.paths.outbox)) == len(rels)
    assert emulator.stats()["rate_limited"] == 0


async def test_429_is_honoured_and_everything_still_arrives(tmp_path: Path) -> None:
    emulator = fast_emulator(rate_limit_rps=20, rate_limit_burst=2)
    # the runner believes it may send far faster than the emulator allows
    config = make_config(tmp_path, limits={"requests_per_second": 200, "burst": 20})
    rels, _ = mixed_inbox(config.paths.inbox, 40)

    await drain(config, emulator)

    assert len(outbox_documents(config.paths.outbox)) == len(rels)
    stats = emulator.stats()
    assert stats["rate_limited"] > 0
    assert all(n == 1 for n in stats["calls_by_reference"].values())


async def test_keep_mode_never_resubmits_unchanged_files(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, inbox={"on_done": "keep"})
    write_files(config.paths.inbox, [("wf/a.txt", b"one"), ("wf/b.txt", b"two")])
    await drain(config, emulator)
    calls_after_first = emulator.stats()["calls_total"]

    await drain(config, emulator)
    assert emulator.stats()["calls_total"] == calls_after_first

    (config.paths.inbox / "wf/b.txt").write_bytes(b"two, changed")
    await drain(config, emulator)
    assert emulator.stats()["calls_total"] == calls_after_first + 1
    assert len(outbox_documents(config.paths.outbox)) == 2


async def test_restart_resumes_without_resubmitting(tmp_path: Path) -> None:
    # calls take "forever" in emulator time until the test moves that time on
    emulator = Emulator(EmulatorSettings(latency_min=1000, latency_max=1000))
    config = make_config(tmp_path)
    rels, _ = mixed_inbox(config.paths.inbox, 50)
    expected_calls = len({rel.rsplit("/", 1)[0] if "/batch-" in rel else rel for rel in rels})
    async with running(config, emulator) as run:
        await run.until(lambda: emulator.stats()["calls_total"] == expected_calls, within=500)

    assert outbox_documents(config.paths.outbox) == {}
    emulator.advance(2000)
    outcome = await drain(config, emulator)

    assert sorted(outbox_documents(config.paths.outbox)) == sorted(rels)
    stats = emulator.stats()
    assert stats["calls_total"] == expected_calls
    assert all(n == 1 for n in stats["calls_by_reference"].values())
    assert outcome.exit_code == ExitCode.FILE_ERRORS


async def test_status_and_retry(tmp_path: Path) -> None:
    emulator = fast_emulator(failure_rate=1.0)
    config = make_config(tmp_path)
    write_files(
        config.paths.inbox,
        [("wf/a.txt", b"one"), ("wf/b.txt", b"two"), ("wf/c.exe", b"unsupported")],
    )
    first = await drain(config, emulator)
    assert first.exit_code == ExitCode.FILE_ERRORS

    async with open_sqlite_store(config.paths.state) as store:
        report = await collect_status(store)
        assert report["files"] == {"done:error": 3}
        assert report["open_calls"] == 0
        assert {e["file"] for e in report["recent_errors"]} == {"wf/a.txt", "wf/b.txt", "wf/c.exe"}
        requeued, impossible = await requeue_failed(store, config)
    assert sorted(requeued) == ["wf/a.txt", "wf/b.txt"]
    # refused before it was sent, and would be refused again as it is: not requeued
    [(rel, why)] = impossible
    assert rel == "wf/c.exe"
    assert why.startswith("it would be refused again: unsupported file type '.exe'")
    assert (config.paths.inbox / "wf/a.txt").read_bytes() == b"one"

    emulator.update(failure_rate=0.0)
    second = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert {rel: kind for rel, (kind, _) in documents.items()} == {
        "wf/a.txt": "result",
        "wf/b.txt": "result",
        "wf/c.exe": "error",
    }
    assert second.delivered == {"result": 2}
    async with open_sqlite_store(config.paths.state) as store:
        report = await collect_status(store)
    assert report["files"] == {"done:result": 2, "done:error": 1, "retried": 2}


async def test_window_route_batches_loose_files(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(
        tmp_path,
        route={
            "list": [
                {
                    "glob": "scans/**",
                    "workflow": "scan-extract",
                    "group": "window",
                    "batch_max_files": 4,
                    "batch_window_seconds": 60,
                },
                {"glob": "**", "workflow": "catch-all"},
            ]
        },
    )
    write_files(
        config.paths.inbox,
        [(f"scans/{n}.png", b"png %d" % n) for n in range(10)] + [("other/x.txt", b"x")],
    )

    await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert len(documents) == 11
    scan_calls = {doc["callID"] for rel, (_, doc) in documents.items() if rel.startswith("scans/")}
    assert len(scan_calls) == 3  # 4 + 4 + 2
    assert {doc["workflow"] for _, doc in documents.values()} == {"scan-extract", "catch-all"}


async def test_v3_polls_many_calls_per_request(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0.3, latency_max=0.3))
    config = make_config(tmp_path, poll={"initial_seconds": 0.2, "max_seconds": 0.5})
    rels = write_files(config.paths.inbox, [(f"wf/{n}.txt", b"n%d" % n) for n in range(60)])

    await drain(config, emulator)

    assert len(outbox_documents(config.paths.outbox)) == len(rels)
    requests = emulator.stats()["requests"]
    polls = sum(requests.get("GET /v3/calls", {}).values())
    single_gets = sum(requests.get("GET /v3/calls/{callID}", {}).values())
    assert single_gets == 0
    assert polls < len(rels) / 2


async def test_large_files_go_multipart(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, api={"multipart_min_bytes": 1})
    write_files(config.paths.inbox, [
        ("wf/a.pdf", b"%PDF-1.4 small"),
        ("wf/batch/b.txt", b"bee"),
        ("wf/batch/c.csv", b"x,y\n"),
    ])

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert {kind for kind, _ in documents.values()} == {"result"}
    assert documents["wf/batch/b.txt"][1]["outputs"][0]["referenceID"] == "b.txt"
    assert outcome.exit_code == ExitCode.OK


async def test_a_call_that_never_finishes_times_out_into_an_error(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=10_000, latency_max=10_000))
    config = make_config(tmp_path, poll={"give_up_after": "0.3s"})
    write_files(config.paths.inbox, [("wf/stuck.txt", b"stuck")])

    outcome = await drain(config, emulator)

    kind, document = outbox_documents(config.paths.outbox)["wf/stuck.txt"]
    assert kind == "error"
    assert document["reason"].startswith("timed out")
    assert outcome.exit_code == ExitCode.FILE_ERRORS


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_unknown_outcomes_are_adopted_never_resent(tmp_path: Path, version: str) -> None:
    # every POST creates its calls and then answers 500; new calls are listed only after a lag
    emulator = fast_emulator(accept_then_500_rate=1.0, list_visibility_lag=0.3)
    config = make_config(tmp_path, api={"version": version, "visibility_window": "5s"})
    rels, _ = mixed_inbox(config.paths.inbox, 30)

    await drain(config, emulator)

    assert sorted(outbox_documents(config.paths.outbox)) == sorted(rels)
    stats = emulator.stats()
    assert all(n == 1 for n in stats["calls_by_reference"].values())
    assert all(n == 1 for n in stats["files_by_content_sha256"].values())


async def test_calls_that_were_never_created_are_sent_again(tmp_path: Path) -> None:
    # 5xx before anything is created: after the visibility window the call is sent again
    emulator = fast_emulator(error_5xx_rate=0.4, seed=7)
    config = make_config(tmp_path, api={"visibility_window": "0.1s"})
    rels, _ = mixed_inbox(config.paths.inbox, 30)

    await drain(config, emulator)

    assert sorted(outbox_documents(config.paths.outbox)) == sorted(rels)
    stats = emulator.stats()
    assert all(n == 1 for n in stats["calls_by_reference"].values())
    assert stats["faults"]["error_5xx"] > 0


async def test_the_daemon_takes_files_as_they_arrive(tmp_path: Path) -> None:
    emulator = fast_emulator()
    # the periodic rescan is far away: only file-system events can find the new file in time
    config = make_config(tmp_path, inbox={"rescan_seconds": 3600, "settle_seconds": 0.1})
    config.paths.inbox.mkdir(parents=True)
    announce, announced = anyio.create_memory_object_stream[set[str]](1)

    async def events(inbox: Path, stop: anyio.Event) -> AsyncIterator[set[str]]:
        async with announced:
            async for paths in announced:
                yield paths

    async with running(config, emulator, events=events) as run:
        await run.clock.sleep(10)  # the watcher's first scan is long over
        write_files(config.paths.inbox, [("wf/arrived.txt", b"hello")])
        await announce.send({str(config.paths.inbox / "wf/arrived.txt")})
        await run.until(lambda: (config.paths.outbox / "wf/arrived.txt.json").exists(), within=60)
    assert (config.paths.archive / "wf/arrived.txt").exists()


async def test_more_finished_calls_than_one_delivery_page(tmp_path: Path) -> None:
    emulator = fast_emulator()
    # the rescan is far away, so nothing but the deliverer itself can pick up a second page
    config = make_config(tmp_path, inbox={"rescan_seconds": 3600})
    rels = write_files(config.paths.inbox, [(f"wf/{n}.txt", b"n%d" % n) for n in range(450)])

    with anyio.fail_after(60):
        await drain(config, emulator)

    assert len(outbox_documents(config.paths.outbox)) == len(rels)


async def test_kept_inputs_are_not_sent_again_after_the_state_is_deleted(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    emulator = fast_emulator()
    config = make_config(tmp_path, inbox={"on_done": "keep"})
    write_files(config.paths.inbox, [("wf/a.txt", b"one"), ("wf/b.txt", b"two")])
    first = await drain(config, emulator)
    assert first.delivered == {"result": 2}
    calls = len(emulator.calls)

    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"state.db{suffix}").unlink(missing_ok=True)
    (config.paths.inbox / "wf/b.txt").write_bytes(b"two, changed")  # new content: sent again
    with capture_logs() as logs:
        second = await drain(config, emulator)
    assert second.delivered == {"result": 1}
    assert len(emulator.calls) == calls + 1
    skipped = [e for e in logs if e["event"].startswith("input already has a document")]
    assert [e["file"] for e in skipped] == ["wf/a.txt"]
    assert skipped[0]["log_level"] == "warning"
