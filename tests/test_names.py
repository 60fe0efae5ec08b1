"""Any name the file system allows travels: bytes in, the same bytes back, valid Unicode shown."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path, PurePosixPath

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import names
from runner.logs import show_names
from runner.route import Destination, is_ignored, route_file
from runner.store.base import NewFile
from runner.store.sqlite import open_sqlite_store

NAME_MAX = 255
name_bytes = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@given(name_bytes)
def test_a_name_maps_back_to_its_exact_bytes(data: bytes) -> None:
    name = names.from_raw(data)
    assert names.raw(name) == data
    shown = names.shown(name)
    shown.encode("utf-8")  # always valid Unicode
    assert names.is_exact(name) == (shown == name)
    fields = names.name_fields("file", name)
    assert fields["file"] == shown
    if names.is_exact(name):
        assert data.decode("utf-8") == name
        assert "fileBase64" not in fields
    else:
        assert base64.b64decode(fields["fileBase64"]) == data


@given(name_bytes)
def test_a_log_line_is_valid_unicode_for_any_name(data: bytes) -> None:
    event = show_names(None, "info", {"event": "file queued", "file": names.from_raw(data)})
    json.dumps(event, ensure_ascii=False).encode("utf-8")


@given(st.lists(name_bytes, min_size=1, max_size=4), name_bytes)
def test_routing_gives_bem_valid_unicode_item_references(folders: list[bytes], leaf: bytes) -> None:
    rel = "/".join(names.from_raw(part) for part in [b"wf", *folders, leaf])
    destination = route_file(PurePosixPath(rel), ())
    assert destination is not None
    destination.item_reference_id.encode("utf-8")
    json.dumps({"itemReferenceID": destination.item_reference_id}).encode("ascii")


def _stored(rel: str, mode: str, key: str) -> NewFile:
    return NewFile(
        rel=rel,
        size=3,
        mtime_ns=1,
        sha256="ab" * 32,
        input_type="text",
        destination=Destination("wf", mode, key, names.shown(rel)),  # type: ignore[arg-type]
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(name_bytes, min_size=1, max_size=6, unique=True))
def test_the_store_keeps_every_name_exactly(leaves: list[bytes]) -> None:
    singles = [names.from_raw(b"wf/" + leaf) for leaf in leaves]
    folder = names.from_raw(b"wf/" + leaves[0] + b"-folder")
    batch = [f"{folder}/{names.from_raw(leaf)}" for leaf in leaves]

    async def check(state: Path) -> None:
        async with open_sqlite_store(state) as store:
            await store.add_files(
                [_stored(rel, "file", rel) for rel in singles]
                + [_stored(rel, "folder", folder) for rel in batch],
                now=1.0,
                batch_limits={},
            )
            known = await store.known_files()
            assert set(known) == set(singles) | set(batch)
            [collecting_call] = await store.collecting_calls()
            assert collecting_call.batch_key == folder
            assert collecting_call.file_count == len(batch)
            files = await store.files_of_calls([collecting_call.id])
            assert [f.rel for f in files[collecting_call.id]] == batch
        async with open_sqlite_store(state, read_only=True) as reader:
            assert set(await reader.known_files()) == set(singles) | set(batch)

    with tempfile.TemporaryDirectory() as root:
        anyio.run(check, Path(root) / "state.db")


def test_names_need_the_file_system_encoding_to_be_utf8() -> None:
    assert os.fsencode("\udcff") == b"\xff"


def _drain_names(root: Path, rels: list[bytes]) -> dict[bytes, dict[str, object]]:
    """Drain an inbox holding ``rels`` (bytes) on the emulator; input name → its document."""
    from runner.emulator import Emulator, EmulatorSettings
    from tests.pipeline import drain, make_config

    config = make_config(root)
    inbox = os.fsencode(config.paths.inbox)
    for index, rel in enumerate(rels):
        path = inbox + b"/" + rel
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"content %d" % index)
    emulator = Emulator(EmulatorSettings(latency_min=0, latency_max=0))
    anyio.run(drain, config, emulator)
    documents: dict[bytes, dict[str, object]] = {}
    for directory, _, files in os.walk(os.fsencode(config.paths.outbox)):
        for name in files:
            with open(directory + b"/" + name, "rb") as fh:
                document = json.loads(fh.read().decode("utf-8"))
            exact = (
                base64.b64decode(str(document["fileBase64"]))
                if "fileBase64" in document
                else str(document["file"]).encode("utf-8")
            )
            assert exact not in documents, f"two documents for {exact!r}"
            documents[exact] = document
    return documents


def test_a_name_that_is_not_utf8_travels_and_blocks_nothing(tmp_path: Path) -> None:
    good = [b"wf/g%d.txt" % i for i in range(5)]
    odd = [b"wf/\xff\xfebad.txt", b"wf/\xfe\xfffolder/x\xff.txt", b"wf/\xfe\xfffolder/y.txt"]
    documents = _drain_names(tmp_path, good + odd)
    assert sorted(documents) == sorted(good + odd)
    assert all(document["status"] == "completed" for document in documents.values())
    bad = documents[b"wf/\xff\xfebad.txt"]
    assert bad["file"] == "wf/\\xff\\xfebad.txt"
    assert os.path.exists(os.fsencode(tmp_path / "outbox") + b"/wf/\xff\xfebad.txt.json")
    batch = documents[b"wf/\xfe\xfffolder/x\xff.txt"]
    assert batch["itemReferenceID"] == "x\\xff.txt"


@settings(max_examples=15, deadline=None)
@given(st.lists(name_bytes, min_size=1, max_size=5))
def test_every_name_the_file_system_allows_ends_in_one_document(leaves: list[bytes]) -> None:
    """Every name but the ones never taken (hidden, ``*.tmp``...): sent or refused, each ends
    in exactly one document that names it exactly."""
    rels = sorted(
        {b"wf/" + leaf for leaf in leaves if not is_ignored(PurePosixPath(names.from_raw(leaf)))}
    )
    with tempfile.TemporaryDirectory() as root:
        documents = _drain_names(Path(root), rels)
    assert sorted(documents) == rels
