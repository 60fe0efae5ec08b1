"""Content dedupe end to end: drains on a fake clock against the emulator, real SQLite, real
files. The emulator counts every call, so "no bem call" is what it saw, not what we think."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.config import Config
from runner.documents import FILE_FIELDS
from runner.status import collect_status
from runner.store.sqlite import open_sqlite_store

from .conftest import fast_emulator
from .pipeline import drain, make_config, outbox_documents, running, write_files

pytestmark = pytest.mark.anyio

SAME = b"the same invoice, byte for byte"
FAILING = b"a bad scan BEM-EMULATOR-FAIL"


def dedupe_config(tmp_path: Path, mode: str = "content", **inbox: Any) -> Config:
    return make_config(tmp_path, inbox={"dedupe": mode, **inbox})


def call_fields(document: dict[str, Any]) -> dict[str, Any]:
    """What a document says about the call: all but the file's own fields and reusedFrom."""
    return {k: v for k, v in document.items() if k not in (*FILE_FIELDS, "reusedFrom")}


async def reused_count(config: Config) -> int:
    async with open_sqlite_store(config.paths.state, read_only=True) as store:
        return int((await collect_status(store))["reused"])


async def test_same_content_under_several_paths_and_workflows_is_one_call_per_workflow_and_type(
    tmp_path: Path,
) -> None:
    emulator = fast_emulator()
    config = dedupe_config(tmp_path)
    copies = {
        "wf-a": ["wf-a/one.txt", "wf-a/two.txt", "wf-a/again.txt"],
        "wf-b": ["wf-b/one.txt", "wf-b/other-name.txt"],
        "wf-a as csv": ["wf-a/one.csv", "wf-a/two.csv"],
    }
    unique = ["wf-a/unique.txt"]
    write_files(config.paths.inbox, [(rel, SAME) for rels in copies.values() for rel in rels])
    write_files(config.paths.inbox, [(unique[0], b"something else")])

    outcome = await drain(config, emulator)

    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == sorted([*unique, *(r for rels in copies.values() for r in rels)])
    assert all(kind == "result" for kind, _ in documents.values())
    stats = emulator.stats()
    assert stats["calls_total"] == len(copies) + 1  # one per (content, workflow, inputType)
    assert all(n == 1 for n in stats["calls_by_reference"].values())
    for rels in copies.values():
        bodies = [documents[rel][1] for rel in rels]
        (original,) = [b for b in bodies if "reusedFrom" not in b]
        for body in bodies:
            assert call_fields(body) == call_fields(original)  # the same call, the same outputs
            assert body["file"] in rels
            assert body["sizeBytes"] == len(SAME)
            if body is not original:
                assert body["reusedFrom"] == original["callID"]
    assert "reusedFrom" not in documents[unique[0]][1]
    assert outcome.delivered == {"result": len(documents)}
    # reused inputs are archived like every other
    assert sorted(
        p.relative_to(config.paths.archive).as_posix()
        for p in config.paths.archive.rglob("*")
        if p.is_file()
    ) == sorted(documents)
    reused = sum(len(rels) - 1 for rels in copies.values())
    assert await reused_count(config) == reused


async def test_with_dedupe_off_every_file_is_its_own_call(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = dedupe_config(tmp_path, "off")
    rels = write_files(config.paths.inbox, [(f"wf/{n}.txt", SAME) for n in range(4)])
    await drain(config, emulator)
    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == sorted(rels)
    assert not any("reusedFrom" in body for _, body in documents.values())
    assert emulator.stats()["calls_total"] == 4
    assert emulator.stats()["files_by_content_sha256"] == {
        next(iter(emulator.stats()["files_by_content_sha256"])): 4
    }
    assert await reused_count(config) == 0
    assert config.inbox.dedupe == make_config(tmp_path / "default").inbox.dedupe


async def test_a_result_from_an_earlier_run_is_reused_after_a_restart(tmp_path: Path) -> None:
    emulator = fast_emulator()
    config = dedupe_config(tmp_path, on_done="keep")
    write_files(config.paths.inbox, [("wf/first.txt", SAME)])
    await drain(config, emulator)
    assert emulator.stats()["calls_total"] == 1

    write_files(config.paths.inbox, [("wf/later/copy.txt", b"x"), ("wf/copy.txt", SAME)])
    await drain(config, emulator)  # a new process, the same state

    documents = outbox_documents(config.paths.outbox)
    first, copy = documents["wf/first.txt"][1], documents["wf/copy.txt"][1]
    assert copy["reusedFrom"] == first["callID"]
    assert call_fields(copy) == call_fields(first)
    assert (copy["file"], copy["sha256"]) == ("wf/copy.txt", first["sha256"])
    # the folder is a batch of its own: sent; the copy cost nothing
    assert emulator.stats()["calls_total"] == 2
    assert (config.paths.inbox / "wf/copy.txt").exists()  # on_done = "keep" holds for it too
    assert await reused_count(config) == 1


async def test_a_batch_item_result_is_reused_by_a_single_file_arriving_with_it(
    tmp_path: Path,
) -> None:
    emulator = fast_emulator()
    config = dedupe_config(tmp_path)
    write_files(
        config.paths.inbox,
        [("wf/folder/page-1.txt", SAME), ("wf/folder/page-2.txt", b"page two"), ("wf/x.txt", SAME)],
    )
    await drain(config, emulator)
    documents = outbox_documents(config.paths.outbox)
    item, single = documents["wf/folder/page-1.txt"][1], documents["wf/x.txt"][1]
    assert emulator.stats()["calls_total"] == 1  # the batch; the single file waited for it
    assert single["reusedFrom"] == item["callID"]
    assert (single["itemReferenceID"], item["itemReferenceID"]) == (None, "page-1.txt")
    assert single["outputs"] == item["outputs"] != []
    assert call_fields(single) == call_fields(item)


async def test_copies_of_a_file_that_fails_are_each_sent_once_and_none_reuses_it(
    tmp_path: Path,
) -> None:
    emulator = fast_emulator()
    config = dedupe_config(tmp_path)
    rels = write_files(config.paths.inbox, [(f"wf/bad-{n}.txt", FAILING) for n in range(3)])
    await drain(config, emulator)
    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == rels
    assert all(kind == "error" for kind, _ in documents.values())
    assert not any("reusedFrom" in body for _, body in documents.values())
    assert len({body["callID"] for _, body in documents.values()}) == 3  # each its own call
    stats = emulator.stats()
    assert stats["calls_total"] == 3
    assert all(n == 1 for n in stats["calls_by_reference"].values())
    assert await reused_count(config) == 0


async def test_when_the_first_call_fails_one_waiting_copy_is_sent_and_the_rest_reuse_it(
    tmp_path: Path,
) -> None:
    emulator = fast_emulator(failure_rate=1.0)
    config = dedupe_config(tmp_path)
    rels = write_files(config.paths.inbox, [(f"wf/{n}.txt", SAME) for n in range(4)])
    async with running(config, emulator) as run:
        await run.until(lambda: emulator.stats()["calls_total"] == 1, within=60)
        emulator.update(failure_rate=0.0)  # the first call fails; bem works again after it
        await run.until(lambda: len(outbox_documents(config.paths.outbox)) == 4, within=600)

    documents = outbox_documents(config.paths.outbox)
    kinds = sorted(kind for kind, _ in documents.values())
    assert kinds == ["error", "result", "result", "result"]
    (failed,) = [rel for rel, (kind, _) in documents.items() if kind == "error"]
    sent = [rel for rel, (_, body) in documents.items() if "reusedFrom" not in body]
    assert failed in sent
    assert len(sent) == 2  # the failed one, then one more: once each
    (second,) = [rel for rel in sent if rel != failed]
    for rel in set(rels) - {failed, second}:
        assert documents[rel][1]["reusedFrom"] == documents[second][1]["callID"]
    assert "reusedFrom" not in documents[failed][1]
    assert emulator.stats()["calls_total"] == 2


async def test_a_copy_arriving_while_the_first_is_in_flight_waits_for_it(tmp_path: Path) -> None:
    emulator = fast_emulator()
    emulator.update(latency_min=50.0, latency_max=50.0)  # bem takes its time
    config = dedupe_config(tmp_path)
    write_files(config.paths.inbox, [("wf/first.txt", SAME)])
    async with running(config, emulator) as run:
        await run.until(lambda: emulator.stats()["calls_total"] == 1, within=60)
        write_files(config.paths.inbox, [("wf/second.txt", SAME)])
        await run.until(lambda: (config.paths.outbox / "wf/second.txt.json").exists(), within=600)
    documents = outbox_documents(config.paths.outbox)
    assert documents["wf/second.txt"][1]["reusedFrom"] == documents["wf/first.txt"][1]["callID"]
    assert emulator.stats()["calls_total"] == 1
