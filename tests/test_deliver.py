from __future__ import annotations

import base64
import errno
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.archive import LeftInPlace, finish_input, finish_inputs
from runner.deliver import Written, write_documents
from runner.documents import Document, documents_for_call, encode, rejection_document
from runner.file_ops import write_atomic
from runner.store.base import CallRow, FileRow


def file_row(n: int, rel: str, item: str | None) -> FileRow:
    return FileRow(
        id=n,
        rel=rel,
        size=3,
        mtime_ns=1,
        sha256="00",
        input_type="text",
        workflow="wf",
        item_reference_id=item,
        call_row_id=1,
        state="queued",
        outcome=None,
        reason=None,
        seen_at=1.0,
        delivered_at=None,
        done_at=None,
    )


def call_row(
    call: Mapping[str, object] | None, *, mode: str = "folder", reason: str | None = None
) -> CallRow:
    return CallRow(
        id=1,
        call_reference_id="bemr-1",
        workflow="wf",
        mode=mode,
        batch_key="wf/f",
        state="terminal",
        opened_at=1.0,
        last_added_at=1.0,
        file_count=3,
        byte_count=9,
        not_before=0.0,
        attempts=0,
        sent_at=2.0,
        submitted_at=2.0,
        call_id="c1",
        status=str(call.get("status")) if call else "failed",
        result_json=json.dumps(call) if call is not None else None,
        error_reason=reason,
        finished_at=3.0,
    )


FILES = [
    file_row(1, "wf/f/a.txt", "a.txt"),
    file_row(2, "wf/f/b.txt", "b.txt"),
    file_row(3, "wf/f/c.txt", "c.txt"),
]


def test_batch_outputs_split_by_reference_then_offset() -> None:
    call = {
        "status": "completed",
        "outputs": [
            {
                "eventID": "1",
                "referenceID": "b.txt",
                "itemOffset": 1,
                "transformedContent": {"b": 1},
            },
            {"eventID": "2", "referenceID": "", "itemOffset": 0, "transformedContent": {"a": 1}},
        ],
        "errors": [{"eventID": "3", "referenceID": "c.txt", "message": "unreadable scan"}],
    }
    documents = {d.file.rel: d for d in documents_for_call(call_row(call), FILES)}
    assert documents["wf/f/a.txt"].outcome == "result"
    assert documents["wf/f/a.txt"].body["outputs"][0]["transformedContent"] == {"a": 1}
    assert documents["wf/f/b.txt"].body["outputs"][0]["eventID"] == "1"
    assert documents["wf/f/c.txt"].outcome == "error"
    assert documents["wf/f/c.txt"].reason == "unreadable scan"


def test_an_item_without_output_is_an_error_not_a_silent_success() -> None:
    call = {"status": "completed", "outputs": [], "errors": []}
    (document,) = documents_for_call(call_row(call, mode="file"), FILES[:1])
    assert document.outcome == "error"
    assert "no output" in (document.reason or "")


def test_a_rejected_call_fails_every_file_with_the_reason() -> None:
    documents = documents_for_call(call_row(None, reason="bem rejected the call: bad"), FILES)
    assert {d.outcome for d in documents} == {"error"}
    assert {d.reason for d in documents} == {"bem rejected the call: bad"}


def written_path(outbox: Path, document: Document) -> Path:
    (outcome,) = write_documents(outbox, [document])
    assert isinstance(outcome, Written), outcome
    return outcome.path


def test_documents_are_private_atomic_and_exactly_one_per_file(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    file = FILES[0]
    error = rejection_document(file)
    written_path(outbox, error)
    assert (outbox / "wf/f/a.txt.error.json").exists()
    result = Document(file, "result", {"file": file.rel}, None)
    path = written_path(outbox, result)
    assert path == outbox / "wf/f/a.txt.json"
    assert not (outbox / "wf/f/a.txt.error.json").exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["a.txt.json"]


def test_write_atomic_leaves_no_temporary_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]


@pytest.mark.parametrize("on_done", ["archive", "delete", "keep"])
def test_finish_input_is_idempotent(tmp_path: Path, on_done: str) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    (inbox / "wf").mkdir(parents=True)
    (inbox / "wf/a.txt").write_bytes(b"abc")
    finish_input(inbox, archive, "wf/a.txt", on_done)
    finish_input(inbox, archive, "wf/a.txt", on_done)  # a crash made us do it again
    assert (inbox / "wf/a.txt").exists() is (on_done == "keep")
    assert (archive / "wf/a.txt").exists() is (on_done == "archive")
    if on_done == "archive":
        assert (archive / "wf/a.txt").read_bytes() == b"abc"


def test_a_file_where_a_folder_should_be_sends_only_that_document_to_the_root(
    tmp_path: Path,
) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "blocked").write_text("a file where a folder should be")
    good = [file_row(1, "wf/a.txt", None), file_row(2, "wf/sub/b.txt", None)]
    bad = file_row(3, "blocked/c.txt", None)
    documents = [rejection_document(f) for f in (good[0], bad, good[1])]
    first, moved, second = write_documents(outbox, documents)
    assert isinstance(first, Written)
    assert first.path == outbox / "wf/a.txt.error.json"
    assert isinstance(second, Written)
    assert second.path == outbox / "wf/sub/b.txt.error.json"
    assert isinstance(moved, Written)
    assert moved.path.parent == outbox
    assert moved.path.name.startswith("c.txt~")
    assert moved.path.name.endswith(".error.json")
    assert moved.instead_of == outbox / "blocked/c.txt.error.json"
    assert json.loads(moved.path.read_text())["file"] == "blocked/c.txt"
    assert json.loads(first.path.read_text())["file"] == "wf/a.txt"
    assert sorted(p.name for p in (outbox / "wf").rglob("*")) == [
        "a.txt.error.json",
        "b.txt.error.json",
        "sub",
    ]


def test_a_page_of_documents_fails_only_where_the_disk_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = tmp_path / "outbox"
    real_replace = os.replace

    def disk_full_for_b(src: str, dst: str, **kwargs: int) -> None:
        if dst.startswith("b.txt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_for_b)
    documents = [
        rejection_document(file_row(n, f"wf/{name}", None))
        for n, name in enumerate(("a.txt", "b.txt"))
    ]
    written, failed = write_documents(outbox, documents)
    assert isinstance(written, Written)
    assert isinstance(failed, OSError)
    assert failed.errno == errno.ENOSPC
    assert sorted(p.name for p in (outbox / "wf").iterdir()) == ["a.txt.error.json"]


def test_a_page_of_inputs_is_finished_file_by_file(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    (inbox / "wf").mkdir(parents=True)
    (archive / "wf").mkdir(parents=True)
    (archive / "wf/blocked.txt").mkdir()  # the archive has a folder where the file should go
    files = []
    for n, rel in enumerate(["wf/a.txt", "wf/blocked.txt"]):
        (inbox / rel).write_bytes(b"abc")
        taken = (inbox / rel).stat().st_mtime_ns
        files.append(msgspec.structs.replace(file_row(n, rel, None), mtime_ns=taken))
    ok, left = finish_inputs(inbox, archive, files, "archive")
    assert ok is None
    assert isinstance(left, LeftInPlace)  # never archivable: not an error to retry
    assert "wf/blocked.txt" in left.reason
    assert (archive / "wf/a.txt").read_bytes() == b"abc"
    assert sorted(p.name for p in (inbox / "wf").iterdir()) == ["blocked.txt"]
    assert finish_inputs(inbox, archive, files[:1], "archive") == [None]  # again, after a crash


# ---------------------------------------------------------------------------------------------
# Which events belong to which file of a batch


def batch_files(references: list[str | None]) -> list[FileRow]:
    return [file_row(n, f"wf/f/{n}-{ref}", ref) for n, ref in enumerate(references)]


def test_an_error_that_matches_no_file_reaches_every_file() -> None:
    call = {
        "status": "completed",
        "outputs": [
            {"eventID": "o1", "referenceID": "a.txt", "itemOffset": 0},
            {"eventID": "o2", "referenceID": "b.txt", "itemOffset": 1},
        ],
        "errors": [
            {"eventID": "e1", "referenceID": "nobody.txt", "message": "lost item"},
            {"eventID": "e2", "message": "the whole call broke"},  # no reference, no offset
        ],
    }
    documents = documents_for_call(call_row(call), FILES[:2])
    for d in documents:
        assert d.outcome == "error"
        assert [e["eventID"] for e in d.body["errors"]] == ["e1", "e2"]
        assert d.reason == "lost item; the whole call broke"
    assert [[o["eventID"] for o in d.body["outputs"]] for d in documents] == [["o1"], ["o2"]]


def test_a_shared_reference_is_settled_by_offset() -> None:
    files = batch_files(["same.txt", "same.txt", "other.txt"])
    call = {
        "status": "completed",
        "outputs": [
            {"eventID": "o0", "referenceID": "same.txt", "itemOffset": 0},
            {"eventID": "o1", "referenceID": "same.txt", "itemOffset": 1},
            {"eventID": "ox", "referenceID": "same.txt"},  # cannot tell whose: nobody's
            {"eventID": "o2", "referenceID": "other.txt", "itemOffset": 7},
        ],
        "errors": [],
    }
    documents = documents_for_call(call_row(call), files)
    outputs = [[o["eventID"] for o in d.body["outputs"]] for d in documents]
    assert outputs == [["o0"], ["o1"], ["o2"]]
    assert {d.outcome for d in documents} == {"result"}


def test_an_output_under_a_reference_never_sent_belongs_to_no_file() -> None:
    call = {
        "status": "completed",
        "outputs": [
            {"eventID": "mine", "referenceID": "a.txt", "itemOffset": 0},
            {"eventID": "someone else's", "referenceID": "x.txt", "itemOffset": 1},
        ],
        "errors": [],
    }
    first, second = documents_for_call(call_row(call), FILES[:2])
    assert first.outcome == "result"
    assert second.outcome == "error"
    assert second.body["outputs"] == []
    assert "1 outputs of the call matched no file" in (second.reason or "")


references = st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=5)
events = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "referenceID": st.sampled_from(["a", "b", "c", "zz", "", None]),
            "itemOffset": st.one_of(st.integers(-1, 6), st.none(), st.just("0")),
        },
    ),
    max_size=8,
)


@given(references, events, events)
def test_every_error_reaches_a_document_and_every_output_at_most_its_own(
    refs: list[str | None], outputs: list[dict[str, object]], errors: list[dict[str, object]]
) -> None:
    outputs = [{**o, "eventID": f"o{n}"} for n, o in enumerate(outputs)]
    errors = [{**e, "eventID": f"e{n}", "message": f"m{n}"} for n, e in enumerate(errors)]
    files = batch_files(refs)
    call = {"status": "completed", "outputs": outputs, "errors": errors}
    documents = documents_for_call(call_row(call), files)
    assert [d.file for d in documents] == files
    for error in errors:
        assert any(error in d.body.get("errors", []) for d in documents)
    for output in outputs:
        holders = [d for d in documents if output in d.body["outputs"]]
        assert len(holders) <= 1
        for holder in holders:
            index = files.index(holder.file)
            reference = output.get("referenceID") or None
            if reference is None:
                assert output.get("itemOffset") == index
            else:
                assert reference == refs[index]
                assert refs.count(reference) == 1 or output.get("itemOffset") == index
    for d in documents:
        assert (d.outcome == "error") is bool(d.body.get("errors") or not d.body["outputs"])


def test_a_name_that_is_not_utf8_is_carried_exactly() -> None:
    rel = os.fsdecode(b"wf/f/\xff\xfebad.txt")
    file = file_row(1, rel, "\\xff\\xfebad.txt")
    call = {"status": "completed", "outputs": [{"referenceID": "\\xff\\xfebad.txt"}]}
    (document,) = documents_for_call(call_row(call), [file])
    (rejected,) = [rejection_document(file)]
    for body in (document.body, rejected.body):
        assert body["file"] == "wf/f/\\xff\\xfebad.txt"
        assert base64.b64decode(body["fileBase64"]) == b"wf/f/\xff\xfebad.txt"
        json.dumps(body, ensure_ascii=False).encode()  # valid UTF-8 JSON


# Any JSON value bem's answers can carry: every float (NaN and infinities aside: a call is read
# by msgspec, which refuses them), integers past 64 bits, any text with lone surrogates too.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-1e-3, max_value=1e-3)
    | st.text()
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=2),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6))
def test_a_document_is_written_exactly_as_json_writes_it(body: dict[str, object]) -> None:
    try:
        expected = json.dumps(body, indent=2, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        expected = json.dumps(body, indent=2, ensure_ascii=True).encode() + b"\n"
    assert encode(body) == expected
