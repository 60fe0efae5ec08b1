"""Outbox names and writes over the whole class of names and layouts the file system allows.

Every input must end in exactly one document that names it, whatever its bytes and length,
whatever folders, files and symbolic links are in the way — and a write that can never
succeed must never come back as an error to retry.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from runner import names
from runner.archive import LeftInPlace, finish_inputs
from runner.daemon import ExitCode
from runner.deliver import Unwritable, Written, write_documents
from runner.documents import Document, rejection_document
from runner.emulator import Emulator, EmulatorSettings
from runner.file_ops import is_permanent
from runner.outbox import (
    KINDS,
    Kind,
    Limits,
    alternative_name,
    cut,
    document_places,
    fits,
    natural_place,
    runner_token,
    size,
    temporary_name,
)
from runner.store.base import FileRow

from .pipeline import drain, make_config, running, write_files

NAME_MAX = 255
PATH_MAX = 4096
FILE_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def file_row(n: int, rel: str) -> FileRow:
    return FileRow(
        id=n,
        rel=rel,
        size=3,
        mtime_ns=1,
        sha256="00",
        input_type="text",
        workflow="wf",
        item_reference_id=None,
        call_row_id=1,
        state="queued",
        outcome=None,
        reason=None,
        seen_at=1.0,
        delivered_at=None,
        done_at=None,
    )


def document(n: int, rel: str, kind: Kind) -> Document:
    file = file_row(n, rel)
    if kind == "error":
        return rejection_document(file)
    return Document(file, "result", {**names.name_fields("file", rel), "outputs": []}, None)


def named_file(body: dict[str, object]) -> bytes:
    """The exact bytes of the name a document records."""
    if "fileBase64" in body:
        return base64.b64decode(str(body["fileBase64"]))
    return str(body["file"]).encode()


def outbox_contents(outbox: Path) -> dict[bytes, list[tuple[Kind, Path]]]:
    """Every file in the outbox, read as a document: input name → [(kind, path)]."""
    found: dict[bytes, list[tuple[Kind, Path]]] = {}
    for folder, _, files in os.walk(outbox):
        for name in files:
            path = Path(folder) / name
            assert name.endswith(".json"), f"not a document: {path!r}"
            raw = path.read_bytes()
            body = json.loads(raw.decode("utf-8"))  # valid UTF-8 JSON, whatever the name
            kind: Kind = "error" if name.endswith(".error.json") else "result"
            found.setdefault(named_file(body), []).append((kind, path))
    return found


def assert_one_document_each(outbox: Path, expected: dict[str, Kind]) -> None:
    contents = outbox_contents(outbox)
    assert set(contents) == {names.raw(rel) for rel in expected}
    for rel, kind in expected.items():
        (only,) = contents[names.raw(rel)]
        assert only[0] == kind, rel
        assert len(names.raw(str(only[1]))) < PATH_MAX  # reachable by an ordinary path


_workspaces = itertools.count()


def workspace(tmp_path: Path) -> Path:
    """A fresh folder for one hypothesis example."""
    path = tmp_path / str(next(_workspaces))
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------
# Every errno is either permanent or retried

NEVER = {
    "EEXIST",
    "EFBIG",
    "EILSEQ",
    "EINVAL",
    "EISDIR",
    "ELOOP",
    "EMLINK",
    "ENAMETOOLONG",
    "ENODEV",
    "ENOTDIR",
    "ENOTEMPTY",
    "ENOTSUP",
    "ENXIO",
    "EOPNOTSUPP",
    "EXDEV",
}
LATER = {"ENOSPC", "EROFS", "EACCES", "EPERM", "EIO", "EDQUOT", "EAGAIN", "EINTR", "EBUSY"}
LATER |= {"ENOENT", "ESTALE", "ENOMEM", "EMFILE", "ENFILE", "ETXTBSY", "ETIMEDOUT"}


@pytest.mark.parametrize(("code", "symbol"), sorted(errno.errorcode.items()))
def test_every_errno_is_permanent_or_retried(code: int, symbol: str) -> None:
    symbols = {s for s in dir(errno) if s.startswith("E") and getattr(errno, s) == code}
    assert not (symbols & NEVER and symbols & LATER), symbols
    assert is_permanent(code) is bool(symbols & NEVER), symbols


def test_an_error_without_a_number_is_retried() -> None:
    assert is_permanent(None) is False


# ---------------------------------------------------------------------------------------------
# Names (pure)

SAFE_BYTES = [b for b in range(1, 256) if b != ord("/")]
raw_names = st.one_of(
    st.lists(st.sampled_from(SAFE_BYTES), min_size=1, max_size=NAME_MAX).map(bytes),
    st.integers(1, NAME_MAX - 4).map(lambda n: b"x" * n + b".txt"),
    st.text(min_size=1, max_size=80).map(lambda t: t.encode()),
).filter(lambda b: b not in (b".", b"..") and b"\0" not in b and b"/" not in b)
colliding_segments = st.sampled_from(
    ["a", "a.json", "a.error", "a.error.json", "a.json.json", "a.error.error", ".json", "b"]
)


def rel_of(parts: list[bytes]) -> str:
    return names.from_raw(b"/".join(parts))


rels = st.lists(raw_names, min_size=1, max_size=4).map(rel_of)
colliding_rels = st.lists(colliding_segments, min_size=1, max_size=3).map("/".join)
limits = st.builds(Limits, st.integers(40, NAME_MAX), st.integers(200, PATH_MAX))
ROOT = Path("/outbox")


@given(rels, limits)
def test_every_place_fits_and_its_temporary_too(rel: str, lim: Limits) -> None:
    for kind in KINDS:
        for place in document_places(ROOT, rel, kind, lim):
            assert fits(ROOT, place, lim)
            temporary = temporary_name(place.name, lim.name_max)
            assert len(names.raw(temporary)) <= lim.name_max
            assert temporary.startswith(".")
            assert temporary.endswith(".tmp")
            assert temporary == temporary_name(place.name, lim.name_max)  # same after a crash


@given(rels)
def test_a_file_that_fits_keeps_its_natural_name(rel: str) -> None:
    lim = Limits(NAME_MAX, PATH_MAX)
    for kind in KINDS:
        natural = natural_place(rel, kind)
        places = document_places(ROOT, rel, kind, lim)
        if fits(ROOT, natural, lim) and not (kind == "result" and rel.endswith(".error")):
            assert places[0] == natural
        else:
            assert natural not in places


@given(st.lists(st.one_of(rels, colliding_rels), min_size=2, max_size=6, unique=True), limits)
def test_no_two_documents_share_a_name(rel_list: list[str], lim: Limits) -> None:
    owners: dict[Path, tuple[str, Kind]] = {}
    for rel, kind in itertools.product(rel_list, KINDS):
        for place in document_places(ROOT, rel, kind, lim):
            owner = owners.setdefault(place.path(ROOT), (rel, kind))
            assert owner == (rel, kind), place


@given(rels, st.sampled_from(KINDS))
def test_the_name_says_which_kind_of_document_it_is(rel: str, kind: Kind) -> None:
    for place in document_places(ROOT, rel, kind, Limits()):
        assert place.name.endswith(".error.json") is (kind == "error")


@given(rels, st.sampled_from(KINDS), st.integers(0, NAME_MAX))
def test_an_alternative_name_is_always_utf8(rel: str, kind: Kind, room: int) -> None:
    name = alternative_name(rel, kind, room)
    if name is not None:
        assert names.is_exact(name)
        assert len(names.raw(name)) <= room
        assert "/" not in name


@given(st.text(min_size=1, max_size=300), st.integers(0, 300))
def test_a_cut_ends_between_characters(text: str, budget: int) -> None:
    text = names.from_raw(text.encode())
    shortened = cut(text, budget)
    assert text.startswith(shortened)
    assert len(names.raw(shortened)) <= budget
    assert names.raw(text).startswith(names.raw(shortened))
    assert names.is_exact(shortened)  # UTF-8 stays UTF-8
    # the longest such start: one more character would not fit
    assert shortened == text or len(names.raw(text[: len(shortened) + 1])) > budget


@given(st.binary(max_size=300))
def test_a_names_size_is_its_bytes_on_the_file_system(data: bytes) -> None:
    assert size(names.from_raw(data)) == len(data)


def test_the_alternative_name_is_documented_and_stable() -> None:
    rel = "wf/" + "x" * 251 + ".txt"
    name = alternative_name(rel, "result", NAME_MAX)
    assert name is not None
    assert len(name.encode()) == NAME_MAX
    assert name.startswith("x" * 200)
    assert name.endswith(".json")
    _stem, _, digest = name.removesuffix(".json").rpartition("~")
    assert len(digest) == 16
    assert all(c in "0123456789abcdef" for c in digest)
    assert alternative_name(rel, "result", NAME_MAX) == name


# ---------------------------------------------------------------------------------------------
# Real files: names


@FILE_SETTINGS
@given(st.lists(raw_names, min_size=1, max_size=5, unique=True), st.data())
def test_any_name_ends_in_exactly_one_document(
    tmp_path: Path, raw_list: list[bytes], data: st.DataObject
) -> None:
    outbox = workspace(tmp_path) / "outbox"
    rels = [rel_of([b"wf", raw]) for raw in raw_list]
    expected: dict[str, Kind] = {}
    for round_ in range(2):  # a second delivery, perhaps of the other kind, replaces the first
        kinds = [data.draw(st.sampled_from(KINDS)) for _ in rels]
        documents = [
            document(n, rel, kind) for n, (rel, kind) in enumerate(zip(rels, kinds, strict=True))
        ]
        outcomes = write_documents(outbox, documents)
        assert all(isinstance(o, Written) for o in outcomes), (round_, outcomes)
        expected = dict(zip(rels, kinds, strict=True))
        assert_one_document_each(outbox, expected)


@pytest.mark.parametrize("length", [246, 250, 251, 255])
@pytest.mark.parametrize("kind", KINDS)
def test_a_name_at_the_limit_ends_in_one_document(tmp_path: Path, length: int, kind: Kind) -> None:
    outbox = tmp_path / "outbox"
    rel = "wf/" + "x" * (length - 4) + ".gif"
    (outcome,) = write_documents(outbox, [document(1, rel, kind)])
    assert isinstance(outcome, Written)
    assert outcome.path.parent == outbox / "wf"
    assert_one_document_each(outbox, {rel: kind})
    if outcome.instead_of is not None:
        assert outcome.why is not None
        assert "too long" in outcome.why


# ---------------------------------------------------------------------------------------------
# Real files: layouts with collisions


@FILE_SETTINGS
@given(
    st.lists(colliding_rels, min_size=1, max_size=6, unique=True),
    st.data(),
)
def test_colliding_layouts_end_in_one_document_each(
    tmp_path: Path, rel_list: list[str], data: st.DataObject
) -> None:
    inbox_like = [r for r in rel_list if not any(o.startswith(r + "/") for o in rel_list)]
    outbox = workspace(tmp_path) / "outbox"
    latest: dict[str, Kind] = {}
    for _ in range(3):  # pages in any order, each file delivered again with any outcome
        page = data.draw(st.permutations(inbox_like))
        kinds = {rel: data.draw(st.sampled_from(KINDS)) for rel in page}
        documents = [document(n, f"wf/{rel}", kinds[rel]) for n, rel in enumerate(page)]
        for outcome in write_documents(outbox, documents):
            assert isinstance(outcome, Written), outcome
        latest |= {f"wf/{rel}": kind for rel, kind in kinds.items()}
        assert_one_document_each(outbox, latest)


@pytest.mark.parametrize("folder_first", [True, False])
def test_a_document_name_taken_by_a_folder(tmp_path: Path, folder_first: bool) -> None:
    outbox = tmp_path / "outbox"
    file_doc, folder_doc = (
        document(1, "wf/b.txt", "result"),
        document(2, "wf/b.txt.json/c.txt", "result"),
    )
    pages = [[folder_doc], [file_doc]] if folder_first else [[file_doc], [folder_doc]]
    outcomes = [o for page in pages for o in write_documents(outbox, page)]
    moved = outcomes[1]
    assert isinstance(moved, Written)
    assert moved.instead_of is not None
    assert_one_document_each(outbox, {"wf/b.txt": "result", "wf/b.txt.json/c.txt": "result"})
    # delivered again (after a crash, or with the other outcome), it stays one document
    for page in pages:
        write_documents(outbox, [msgspec.structs.replace(d, outcome="error") for d in page])
    assert_one_document_each(outbox, {"wf/b.txt": "error", "wf/b.txt.json/c.txt": "error"})


def test_a_result_and_another_files_error_never_share_a_name(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    write_documents(outbox, [document(1, "wf/a", "error"), document(2, "wf/a.error", "result")])
    write_documents(outbox, [document(2, "wf/a.error", "result"), document(1, "wf/a", "error")])
    assert_one_document_each(outbox, {"wf/a": "error", "wf/a.error": "result"})
    assert (outbox / "wf/a.error.json").exists()


def test_a_name_no_place_can_hold_ends_unwritable_not_retried(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    rel = "wf/" + "x" * 251 + ".txt"
    (outbox / "wf").mkdir(parents=True)
    for kind in KINDS:  # a folder under each alternative name, in the folder and at the root
        alternative = alternative_name(rel, kind, NAME_MAX)
        assert alternative is not None
        (outbox / "wf" / alternative).mkdir()
        (outbox / alternative).mkdir()
    (outcome,) = write_documents(outbox, [document(1, rel, "error")])
    assert isinstance(outcome, Unwritable)
    assert "too long" in outcome.reason
    assert "Is a directory" in outcome.reason
    assert outbox_contents(outbox) == {}


# ---------------------------------------------------------------------------------------------
# Real files: long folder chains


def deep_folders(tmp_path: Path, total: int) -> list[str]:
    """Folder names making ``outbox/<folders>`` about ``total`` bytes long."""
    remaining = total - len(str(tmp_path / "outbox").encode())
    folders = []
    while remaining > 0:
        length = min(NAME_MAX, remaining - 1) if remaining > 1 else 1
        folders.append("d" * max(length, 1))
        remaining -= length + 1
    return folders


@FILE_SETTINGS
@given(st.integers(3800, 4200), st.integers(1, NAME_MAX - 4), st.sampled_from(KINDS))
def test_folder_chains_near_path_max(
    tmp_path: Path, total: int, name_length: int, kind: Kind
) -> None:
    root = workspace(tmp_path)
    outbox = root / "outbox"
    rel = "/".join([*deep_folders(root, total), "y" * name_length + ".txt"])
    (outcome,) = write_documents(outbox, [document(1, rel, kind)])
    assert isinstance(outcome, Written), outcome
    assert_one_document_each(outbox, {rel: kind})
    assert outcome.path.read_bytes()  # readable by its path


def test_an_outbox_near_path_max_gets_shorter_alternatives(tmp_path: Path) -> None:
    outbox = tmp_path.joinpath("outbox", *deep_folders(tmp_path, PATH_MAX - 40))
    rel = "wf/" + "z" * 200 + ".txt"
    (outcome,) = write_documents(outbox, [document(1, rel, "result")])
    assert isinstance(outcome, Written)
    assert outcome.path.parent == outbox / "wf"  # cut to fit, still in its own folder
    assert outcome.path.name.startswith("zzz")
    assert outcome.path.name.endswith(".json")
    assert_one_document_each(outbox, {rel: "result"})


def test_an_outbox_too_deep_for_any_name_ends_unwritable(tmp_path: Path) -> None:
    outbox = tmp_path.joinpath("outbox", *deep_folders(tmp_path, PATH_MAX - 15))
    rel = "wf/" + "z" * 200 + ".txt"
    (outcome,) = write_documents(outbox, [document(1, rel, "result")])
    assert isinstance(outcome, Unwritable)
    assert "too long" in outcome.reason


# ---------------------------------------------------------------------------------------------
# Real files: symbolic links in the outbox and the archive


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "outside"
    folder.mkdir()
    yield folder
    assert [p.name for p in folder.iterdir()] in ([], ["kept.txt"]), "nothing written outside"


def test_a_folder_link_in_the_outbox_is_never_followed(tmp_path: Path, outside: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "wf").symlink_to(outside)
    (outbox / "ok").mkdir()
    (outbox / "ok" / "sub").symlink_to(outside)
    rels = ["wf/a.txt", "wf/deeper/b.txt", "ok/sub/c.txt"]
    outcomes = write_documents(outbox, [document(n, rel, "result") for n, rel in enumerate(rels)])
    for outcome in outcomes:
        assert isinstance(outcome, Written)
        assert outcome.path.parent == outbox
    assert_one_document_each(outbox, dict.fromkeys(rels, "result"))


def test_a_link_named_like_a_document_is_replaced_not_followed(
    tmp_path: Path, outside: Path
) -> None:
    outbox = tmp_path / "outbox"
    (outbox / "wf").mkdir(parents=True)
    kept = outside / "kept.txt"
    kept.write_bytes(b"not ours")
    (outbox / "wf/a.txt.json").symlink_to(kept)
    # a "temporary" planted beside it
    (outbox / "wf" / temporary_name("a.txt.json", NAME_MAX)).symlink_to(kept)
    (outcome,) = write_documents(outbox, [document(1, "wf/a.txt", "result")])
    assert isinstance(outcome, Written)
    assert outcome.instead_of is None
    assert kept.read_bytes() == b"not ours"
    assert_one_document_each(outbox, {"wf/a.txt": "result"})


def inbox_with(tmp_path: Path, rels: list[str]) -> tuple[Path, list[FileRow]]:
    inbox = tmp_path / "inbox"
    files = []
    for n, rel in enumerate(rels):
        path = inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"abc")
        files.append(msgspec.structs.replace(file_row(n, rel), mtime_ns=path.stat().st_mtime_ns))
    return inbox, files


def test_a_folder_link_in_the_archive_is_never_followed(tmp_path: Path, outside: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "wf").symlink_to(outside)
    inbox, files = inbox_with(tmp_path, ["wf/a.txt", "other/b.txt"])
    left, done = finish_inputs(inbox, archive, files, "archive")
    assert isinstance(left, LeftInPlace)
    assert "wf/a.txt" in left.reason
    assert done is None
    assert (inbox / "wf/a.txt").read_bytes() == b"abc"  # left where it is
    assert (archive / "other/b.txt").read_bytes() == b"abc"
    assert finish_inputs(inbox, archive, files, "archive")[0] == left  # never an error to retry


def test_a_link_in_the_archive_named_like_the_input_is_replaced(
    tmp_path: Path, outside: Path
) -> None:
    archive = tmp_path / "archive"
    (archive / "wf").mkdir(parents=True)
    kept = outside / "kept.txt"
    kept.write_bytes(b"not ours")
    (archive / "wf/a.txt").symlink_to(kept)
    inbox, files = inbox_with(tmp_path, ["wf/a.txt"])
    assert finish_inputs(inbox, archive, files, "archive") == [None]
    assert kept.read_bytes() == b"not ours"
    assert not (archive / "wf/a.txt").is_symlink()
    assert (archive / "wf/a.txt").read_bytes() == b"abc"


@pytest.mark.parametrize(
    "blocker", ["folder", "file in the way", "too long"], ids=lambda b: b.replace(" ", "-")
)
def test_an_input_the_archive_can_never_take_is_left_once(tmp_path: Path, blocker: str) -> None:
    archive = tmp_path / "archive"
    rel = "wf/a.txt"
    if blocker == "folder":
        (archive / "wf/a.txt").mkdir(parents=True)
    elif blocker == "file in the way":
        archive.mkdir()
        (archive / "wf").write_bytes(b"a file where a folder should be")
    else:
        archive = tmp_path.joinpath("archive", *deep_folders(tmp_path, PATH_MAX - 5))
    inbox, files = inbox_with(tmp_path, [rel])
    for _ in range(2):
        (outcome,) = finish_inputs(inbox, archive, files, "archive")
        assert isinstance(outcome, LeftInPlace), outcome
    assert (inbox / rel).read_bytes() == b"abc"


# ---------------------------------------------------------------------------------------------
# A whole drain: each of these used to retry every 5 s forever


@pytest.mark.anyio
async def test_a_drain_with_names_the_outbox_cannot_hold_ends(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0.01, latency_max=0.03))
    config = make_config(tmp_path)
    long_text = "wf/" + "x" * 251 + ".txt"  # its result name is too long
    long_gif = "wf/" + "g" * 246 + ".gif"  # rejected; its error name is too long
    rels = [long_text, long_gif, "wf/b.txt", "wf/b.txt.json/c.txt", "wf/a", "wf/a.error"]
    rels += ["linked/d.txt"]
    write_files(config.paths.inbox, [(rel, rel.encode()) for rel in rels])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config.paths.outbox.mkdir()
    (config.paths.outbox / "linked").symlink_to(elsewhere)

    with capture_logs() as logs, anyio.fail_after(60):
        outcome = await drain(config, emulator)

    assert outcome.exit_code in (ExitCode.OK, ExitCode.FILE_ERRORS)
    contents = outbox_contents(config.paths.outbox)
    assert set(contents) == {rel.encode() for rel in rels}
    assert all(len(found) == 1 for found in contents.values())
    assert list(elsewhere.iterdir()) == []
    assert not [e for e in logs if e["event"].startswith("cannot write")]  # nothing retried
    moved = {e["file"] for e in logs if e["event"] == "document written under another name"}
    assert {long_text, long_gif, "linked/d.txt"} <= moved


def deep_input(inbox: Path, total: int) -> tuple[str, FileRow]:
    """An input whose path is longer than PATH_MAX (made folder by folder, as a user could)."""
    folders = deep_folders(inbox, total)
    inbox.mkdir(parents=True, exist_ok=True)
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            os.mkdir(folder, dir_fd=fd)
            child = os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file_fd = os.open("a.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(file_fd, b"abc")
        os.close(file_fd)
        st = os.stat("a.txt", dir_fd=fd)
    finally:
        os.close(fd)
    rel = "/".join([*folders, "a.txt"])
    return rel, msgspec.structs.replace(file_row(1, rel), mtime_ns=st.st_mtime_ns)


@pytest.mark.parametrize("on_done", ["archive", "delete"])
def test_an_input_whose_path_is_too_long_is_left_once(tmp_path: Path, on_done: str) -> None:
    inbox = tmp_path / "inbox"
    _, file = deep_input(inbox, PATH_MAX + 100)
    (outcome,) = finish_inputs(inbox, tmp_path / "archive", [file], on_done)
    assert isinstance(outcome, LeftInPlace), outcome
    assert "too long" in outcome.reason.lower()


def test_an_archive_on_another_file_system_gets_a_complete_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "archive"
    inbox, files = inbox_with(tmp_path, ["wf/a.txt"])
    real_replace = os.replace
    renamed_from: list[str] = []

    def across_devices(src: Any, dst: Any, **kwargs: Any) -> None:
        if "src_dir_fd" not in kwargs:  # from the inbox: another file system
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        renamed_from.append(src)
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", across_devices)
    token = runner_token("host-1")
    assert finish_inputs(inbox, archive, files, "archive", token=token) == [None]
    assert renamed_from == [temporary_name("a.txt", NAME_MAX, token)], "this runner's temporary"
    assert (archive / "wf/a.txt").read_bytes() == b"abc"
    assert (archive / "wf/a.txt").stat().st_mtime_ns == files[0].mtime_ns
    assert not (inbox / "wf/a.txt").exists()
    assert sorted(p.name for p in (archive / "wf").iterdir()) == ["a.txt"]


@pytest.mark.anyio
async def test_a_drain_ends_when_no_document_or_archive_can_ever_be_written(
    tmp_path: Path,
) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0.01, latency_max=0.03))
    deep = tmp_path.joinpath("outbox", *deep_folders(tmp_path, PATH_MAX - 15))
    config = make_config(tmp_path, paths={"outbox": str(deep)})
    write_files(config.paths.inbox, [("wf/" + "z" * 200 + ".txt", b"z"), ("wf/b.txt", b"b")])
    (config.paths.archive / "wf/b.txt").mkdir(parents=True)  # the archive cannot take it

    with capture_logs() as logs, anyio.fail_after(60):
        outcome = await drain(config, emulator)

    assert outcome.exit_code == ExitCode.FILE_ERRORS
    failed = [e for e in logs if e["event"] == "no document can be written for this file; it fails"]
    assert [e["file"] for e in failed] == ["wf/" + "z" * 200 + ".txt"]
    left = [
        e for e in logs if e["event"] == "the input can never be archived; it stays in the inbox"
    ]
    assert [e["file"] for e in left] == ["wf/b.txt"]
    assert (config.paths.inbox / "wf/b.txt").read_bytes() == b"b"
    assert not [e for e in logs if "will retry" in e["event"]]


@pytest.mark.anyio
async def test_an_input_left_in_the_inbox_is_not_sent_again(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0.01, latency_max=0.03))
    config = make_config(tmp_path, inbox={"rescan_seconds": 0.05})
    (config.paths.archive / "wf/b.txt").mkdir(parents=True)  # the archive cannot take it
    write_files(config.paths.inbox, [("wf/b.txt", b"left behind")])

    def delivered(logs: list[MutableMapping[str, Any]], rel: str) -> bool:
        return any(e["event"] == "file delivered" and e["file"] == rel for e in logs)

    with capture_logs() as logs:
        async with running(config, emulator) as run:
            await run.until(lambda: any(e["event"].startswith("the input can") for e in logs))
            for later in ("wf/c.txt", "wf/d.txt", "wf/e.txt"):  # several rescans go by
                write_files(config.paths.inbox, [(later, later.encode())])
                await run.until(lambda: delivered(logs, later))  # noqa: B023

    sent = emulator.stats()["files_by_content_sha256"]
    assert sent[hashlib.sha256(b"left behind").hexdigest()] == 1
    assert [e["file"] for e in logs if e["event"] == "file delivered"].count("wf/b.txt") == 1
