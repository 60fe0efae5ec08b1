"""End to end: inbox → emulator → outbox, with real SQLite and real files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from runner.daemon import ExitCode
from runner.emulator import Emulator, EmulatorSettings

from .pipeline import drain, leftover_temporaries, make_config, outbox_documents, write_files

pytestmark = pytest.mark.anyio

TYPES = ["txt", "pdf", "csv", "json", "png", "eml", "html", "xlsx", "docx", "jpg"]


def fast_emulator(**changes: object) -> Emulator:
    settings = EmulatorSettings(latency_min=0.01, latency_max=0.05, **changes)  # type: ignore[arg-type]
    return Emulator(settings)


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
    assert sorted(p.relative_to(config.paths.archive).as_posix()
                  for p in config.paths.archive.rglob("*") if p.is_file()) == sorted(rels)
    assert not [p for p in config.paths.inbox.rglob("*") if p.is_file()]


async def test_batch_folder_is_one_call_split_per_item(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [
        ("invoices/march/a.txt", b"alpha"),
        ("invoices/march/sub/b.txt", b"beta"),
        ("invoices/march/c.txt", b"gamma BEM-EMULATOR-FAIL"),
    ])

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert {rel: kind for rel, (kind, _) in documents.items()} == {
        "invoices/march/a.txt": "result",
        "invoices/march/sub/b.txt": "result",
        "invoices/march/c.txt": "error",
    }
    call_ids = {doc["callID"] for _, doc in documents.values()}
    assert len(call_ids) == 1
    kind, doc = documents["invoices/march/sub/b.txt"]
    assert doc["itemReferenceID"] == "sub/b.txt"
    assert [o["referenceID"] for o in doc["outputs"]] == ["sub/b.txt"]
    _, error = documents["invoices/march/c.txt"]
    assert error["reason"]
    assert error["errors"][0]["referenceID"] == "c.txt"
    assert outcome.exit_code == ExitCode.FILE_ERRORS


async def test_bad_input_gets_an_error_document_and_is_never_sent(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = make_config(tmp_path, inbox={"max_file_bytes": 100})
    write_files(config.paths.inbox, [
        ("wf/empty.txt", b""),
        ("wf/program.exe", b"MZ..."),
        ("wf/huge.txt", b"x" * 101),
        ("loose.txt", b"no workflow folder"),
        ("wf/good.txt", b"fine"),
        ("wf/.hidden.txt", b"never taken"),
        ("wf/partial.pdf.part", b"never taken"),
        ("unknown-workflow/x.txt", b"404 from bem"),
        ("wf/invalid.txt", b"BEM-EMULATOR-INVALID"),
    ])

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    reasons = {rel: doc["reason"] for rel, (kind, doc) in documents.items() if kind == "error"}
    assert set(documents) == {"wf/empty.txt", "wf/program.exe", "wf/huge.txt", "loose.txt",
                              "wf/good.txt", "unknown-workflow/x.txt", "wf/invalid.txt"}
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
    posts = {route: counts for route, counts in emulator.stats()["requests"].items()
             if route.startswith("POST")}
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
