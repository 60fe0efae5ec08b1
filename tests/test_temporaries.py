"""Temporaries unique per runner: two runners writing one document never share a temporary, so
whatever the interleaving one complete document is left; a dead runner's leftovers go."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from hypothesis import given
from hypothesis import strategies as st

from runner import names
from runner.file_ops import remove_dead_temporaries, replace_via_temporary
from runner.outbox import (
    NAME_MAX,
    RESULT_SUFFIX,
    SINGLE_OWNER_TOKEN,
    runner_token,
    size,
    temporary_name,
    temporary_token,
)
from runner.route import is_ignored

# any name a folder can hold: no "/" nor NUL, not "." or "..", up to NAME_MAX bytes
document_names = (
    st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1)
    .map(lambda text: text + RESULT_SUFFIX)
    .filter(lambda name: size(name) <= NAME_MAX)
)
long_names = st.integers(NAME_MAX - 40, NAME_MAX - len(RESULT_SUFFIX)).map(
    lambda n: "é" * (n // 2) + RESULT_SUFFIX
)
runner_ids = st.text(min_size=1, max_size=60)


@given(st.one_of(document_names, long_names), runner_ids, runner_ids)
def test_each_runner_has_its_own_temporary_that_fits_and_is_never_a_document(
    name: str, first: str, second: str
) -> None:
    tokens = {runner_token(first), runner_token(second)}
    temporaries = {temporary_name(name, NAME_MAX, token) for token in tokens}
    assert len(temporaries) == len(tokens), "one temporary per runner"
    assert {temporary_token(temporary) for temporary in temporaries} == tokens
    for temporary in temporaries:
        assert size(temporary) <= NAME_MAX
        assert temporary.startswith(".")
        assert temporary.endswith(".tmp")
        assert not temporary.endswith(".json"), "never read as a result"
        assert is_ignored(PurePosixPath("wf", names.shown(temporary))), "never an input"
    assert temporary_token(name) is None, "a document is no temporary"


Write = Callable[[], None]


def writer(folder_fd: int, name: str, data: bytes, token: str, inside: Write | None) -> Write:
    """A write of ``name`` under ``token`` that runs ``inside`` (another writer) halfway through
    its own: after writing part of its temporary, before its fsync and rename."""

    def fill(fh: BinaryIO) -> None:
        fh.write(data[: len(data) // 2])
        if inside is not None:
            inside()
        fh.write(data[len(data) // 2 :])
        fh.flush()
        os.fsync(fh.fileno())

    def write() -> None:
        replace_via_temporary(folder_fd, name, fill, name_max=NAME_MAX, token=token)

    return write


@given(
    st.one_of(document_names, long_names),
    st.lists(runner_ids, min_size=2, max_size=4, unique_by=runner_token),
    st.binary(min_size=1, max_size=4096),
)
def test_runners_writing_one_document_interleaved_leave_it_whole_and_once(
    name: str, ids: list[str], data: bytes
) -> None:
    with tempfile.TemporaryDirectory() as root:
        folder_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            write: Write | None = None
            for runner_id in ids:  # the first runner's write holds all the others' inside it
                write = writer(folder_fd, name, data, runner_token(runner_id), write)
            assert write is not None
            write()
        finally:
            os.close(folder_fd)
        assert os.listdir(root) == [name]
        assert Path(root, name).read_bytes() == data


def test_only_the_temporaries_of_runners_gone_are_removed(tmp_path: Path) -> None:
    live, gone = runner_token("host-1"), runner_token("host-2")
    (tmp_path / "wf").mkdir()
    kept = [
        tmp_path / "wf/a.txt.json",
        tmp_path / "wf" / temporary_name("b.txt.json", NAME_MAX, live),
        tmp_path / "wf/.c.txt.json.tmp",  # not one of ours: no token
        tmp_path / "wf/.d.txt.json.zzzzzzzz.tmp",
    ]
    removed = [
        tmp_path / temporary_name("a.txt.json", NAME_MAX, gone),
        tmp_path / "wf" / temporary_name("a.txt.json", NAME_MAX, gone),
        tmp_path / "wf" / temporary_name("e.json", NAME_MAX, SINGLE_OWNER_TOKEN),
    ]
    for path in kept + removed:
        path.write_bytes(b"x")
    assert sorted(remove_dead_temporaries(tmp_path, {live})) == sorted(removed)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
