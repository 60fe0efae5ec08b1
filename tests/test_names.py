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
from runner.route import Destination, route_file
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
            [open_group] = await store.open_groups()
            assert open_group.group_key == folder
            assert open_group.file_count == len(batch)
            files = await store.files_of_groups([open_group.id])
            assert [f.rel for f in files[open_group.id]] == batch
        async with open_sqlite_store(state, read_only=True) as reader:
            assert set(await reader.known_files()) == set(singles) | set(batch)

    with tempfile.TemporaryDirectory() as root:
        anyio.run(check, Path(root) / "state.db")


def test_names_need_the_file_system_encoding_to_be_utf8() -> None:
    assert os.fsencode("\udcff") == b"\xff"
