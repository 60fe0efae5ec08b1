from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import Any, get_args

import msgspec
import pytest
from bem.types.input_type import InputType
from hypothesis import given
from hypothesis import strategies as st

from runner.route import (
    INPUT_TYPES,
    Destination,
    Route,
    glob_matches,
    glob_problem,
    input_type_for,
    is_ignored,
    route_file,
    workflow_name_problem,
)

P = PurePosixPath

# -- input types ------------------------------------------------------------------------------


def test_input_types_are_the_documented_extensions() -> None:
    assert dict(INPUT_TYPES) == {
        "csv": "csv",
        "docx": "docx",
        "eml": "email",
        "heic": "heic",
        "heif": "heif",
        "html": "html",
        "htm": "html",
        "jpg": "jpeg",
        "jpeg": "jpeg",
        "jfif": "jpeg",
        "json": "json",
        "m4a": "m4a",
        "mp3": "mp3",
        "pdf": "pdf",
        "png": "png",
        "txt": "text",
        "wav": "wav",
        "webp": "webp",
        "xls": "xls",
        "xlsx": "xlsx",
        "xml": "xml",
        "pptx": "pptx",
        "mp4": "mp4",
        "mov": "mov",
    }


def test_every_input_type_is_one_bem_knows() -> None:
    assert set(INPUT_TYPES.values()) <= set(get_args(InputType))
    assert all(ext == ext.lower() and "." not in ext for ext in INPUT_TYPES)


def test_input_types_cannot_be_changed() -> None:
    with pytest.raises(TypeError):
        INPUT_TYPES["exe"] = "exe"  # type: ignore[index]


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("wf/a.pdf", "pdf"),
        ("wf/A.PDF", "pdf"),
        ("wf/photo.JPG", "jpeg"),
        ("wf/photo.jfif", "jpeg"),
        ("wf/mail.eml", "email"),
        ("wf/notes.txt", "text"),
        ("wf/page.htm", "html"),
        ("wf/deep/er/sheet.xlsx", "xlsx"),
        ("wf/archive.tar.gz", None),
        ("wf/report.pdf.zip", None),
        ("wf/README", None),
        ("wf/trailing.", None),
        ("wf/.pdf", None),
        ("wf/a.exe", None),
        ("pdf", None),
    ],
)
def test_input_type_for(rel: str, expected: str | None) -> None:
    assert input_type_for(P(rel)) == expected


# -- ignored files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        "wf/.hidden.pdf",
        "wf/.ready",
        ".ready",
        "wf/batch/.ready",
        ".git/config",
        "wf/.cache/a.pdf",
        "wf/a.pdf.tmp",
        "wf/a.pdf.TMP",
        "wf/a.part",
        "wf/a.pdf.crdownload",
        "wf/a.pdf.CrDownload",
        "wf/upload.part/a.pdf",
        "wf/..",
    ],
)
def test_is_ignored(rel: str) -> None:
    assert is_ignored(P(rel))


@pytest.mark.parametrize(
    "rel",
    [
        "wf/a.pdf",
        "wf/batch/sub/a.pdf",
        "wf/a.tmp.pdf",
        "wf/partial.pdf",
        "wf/a.pdf.",
        "wf/notes.ready",
        "wf/tmp",
        "wf/x.crdownloads",
    ],
)
def test_is_not_ignored(rel: str) -> None:
    assert not is_ignored(P(rel))


# -- glob matching: examples ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "path", "expected"),
    [
        ("invoices/**", "invoices/a.pdf", True),
        ("invoices/**", "invoices/2024/03/a.pdf", True),
        ("invoices/**", "invoices", True),  # ** spans zero components too
        ("invoices/**", "invoicesX/a.pdf", False),
        ("invoices/**", "other/invoices/a.pdf", False),
        ("**/*.pdf", "a.pdf", True),
        ("**/*.pdf", "x/y/z/a.pdf", True),
        ("**/*.pdf", "x/y/z/a.png", False),
        ("a/**/b.pdf", "a/b.pdf", True),
        ("a/**/b.pdf", "a/x/y/b.pdf", True),
        ("a/**/b.pdf", "ab.pdf", False),
        ("a/**/**/b", "a/b", True),
        ("**", "anything/at/all.pdf", True),
        ("*.pdf", "a.pdf", True),
        ("*.pdf", "x/a.pdf", False),  # anchored: only the top level
        ("*/*.pdf", "x/a.pdf", True),
        ("*", "x/a.pdf", False),
        ("a*/b", "abc/b", True),
        ("a*/b", "a/b", True),
        ("a**b/c", "axyb/c", True),  # ** inside a component is a plain *
        ("a**b/c", "ax/yb/c", False),
        ("?.pdf", "a.pdf", True),
        ("?.pdf", "ab.pdf", False),
        ("scan[0-9].png", "scan7.png", True),
        ("scan[0-9].png", "scanx.png", False),
        ("scan[!0-9].png", "scanx.png", True),
        ("scan[^0-9].png", "scan5.png", False),
        ("a[/]b", "a/b", False),  # an unclosed [ in a component is literal
        ("a[/]b", "a[/]b", True),
        ("x[!a]y", "x/y", False),
        ("lit\\*.pdf", "lit*.pdf", True),
        ("lit\\*.pdf", "litX.pdf", False),
        ("a[]]b", "a]b", True),
        ("a[z-a]b", "aab", False),  # a reversed range matches nothing
        ("/invoices/*", "invoices/a.pdf", True),
        ("invoices/", "invoices/sub/a.pdf", True),
        ("invoices//*.pdf", "invoices/a.pdf", True),
        ("Invoices/**", "invoices/a.pdf", False),  # case-sensitive, like the file system
        ("a.b", "aXb", False),
        ("(x)+", "(x)+", True),
    ],
)
def test_glob_examples(glob: str, path: str, expected: bool) -> None:
    assert glob_matches(glob, path) is expected
    assert glob_matches(glob, P(path)) is expected


def test_an_empty_glob_is_rejected() -> None:
    for glob in ("", "/", "//"):
        with pytest.raises(ValueError, match="cannot be empty"):
            glob_matches(glob, "a")


# -- glob matching against references ---------------------------------------------------------

NAME_CHARS = "abc.-_]!"
name = st.text(alphabet=NAME_CHARS, min_size=1, max_size=6)
pattern_token = st.sampled_from(
    ["a", "b", "c", ".", "-", "_", "*", "?", "[ab]", "[!a]", "[a-c]", "[]a]", "[!]a]", "[b-a]"]
)
component_pattern = st.lists(pattern_token, min_size=1, max_size=5).map("".join)


@given(pattern=component_pattern, text=name)
def test_one_component_matches_like_fnmatch(pattern: str, text: str) -> None:
    assert glob_matches(pattern, text) == fnmatchcase(text, pattern)


@given(
    patterns=st.lists(component_pattern.filter(lambda p: p != "**"), min_size=1, max_size=4),
    names=st.lists(name, min_size=1, max_size=4),
)
def test_components_match_one_by_one(patterns: list[str], names: list[str]) -> None:
    expected = len(patterns) == len(names) and all(
        fnmatchcase(text, pattern) for text, pattern in zip(names, patterns, strict=False)
    )
    assert glob_matches("/".join(patterns), "/".join(names)) == expected


def reference_match(patterns: Sequence[str], names: Sequence[str]) -> bool:
    """Component-wise matcher: ``**`` takes any number of components, others one (fnmatch)."""
    if not patterns:
        return not names
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        return any(reference_match(rest, names[skip:]) for skip in range(len(names) + 1))
    return bool(names) and fnmatchcase(names[0], head) and reference_match(rest, names[1:])


@given(
    patterns=st.lists(st.one_of(st.just("**"), component_pattern), min_size=1, max_size=5),
    names=st.lists(name, min_size=1, max_size=5),
)
def test_double_star_globs_match_like_the_reference(patterns: list[str], names: list[str]) -> None:
    assert glob_matches("/".join(patterns), "/".join(names)) == reference_match(patterns, names)


@given(names=st.lists(name, min_size=1, max_size=5))
def test_a_glob_of_the_literal_path_matches_only_that_path(names: list[str]) -> None:
    path = "/".join(names)
    literal = "/".join(
        "".join(f"\\{char}" if char in "*?[\\" else char for char in part) for part in names
    )
    assert glob_matches(literal, path)
    assert not glob_matches(literal, path + "x")
    assert not glob_matches(literal, "x/" + path)


# -- Route validation -------------------------------------------------------------------------


def test_route_defaults() -> None:
    route = Route(glob="invoices/**", workflow="invoice-extract")
    assert (route.group, route.batch_max_files, route.batch_max_bytes) == ("file", 50, 50_000_000)
    assert route.batch_window_seconds == 10.0
    with pytest.raises(AttributeError, match="immutable"):
        route.workflow = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"glob": ""}, "cannot be empty"),
        ({"workflow": ""}, "workflow name cannot be empty"),
        ({"workflow": "  "}, "workflow name cannot be empty"),
        ({"group": "batch"}, "group"),
        ({"batch_max_files": 0}, "batch_max_files"),
        ({"batch_max_bytes": 0}, "batch_max_bytes"),
        ({"batch_window_seconds": 0.0}, "batch_window_seconds"),
        ({"batch_window_seconds": float("nan")}, "batch_window_seconds"),
        ({"batch_window_seconds": float("inf")}, "batch_window_seconds"),
        ({"batch_window_seconds": 1e300}, "batch_window_seconds"),
        ({"batch_max_files": True}, "batch_max_files"),
        ({"batch_max_files": "5"}, "batch_max_files"),
        ({"batch_max_files": 10**20}, "batch_max_files"),
        ({"batch_max_bytes": 2.5}, "batch_max_bytes"),
        ({"batch_window_seconds": "10s"}, "batch_window_seconds"),
        ({"batch_window_seconds": False}, "batch_window_seconds"),
        ({"glob": "/"}, "cannot be empty"),
        ({"glob": "//"}, "cannot be empty"),
        ({"glob": "./a"}, "'.' component"),
        ({"glob": "a/../b"}, "'..' component"),
        ({"glob": ".git/**"}, "hidden"),
        ({"glob": "**/.*"}, "hidden"),
        ({"glob": "a/*.part"}, "never taken"),
        ({"glob": "a/[z-a]"}, "matches nothing"),
        ({"glob": "a\x00b"}, "NUL"),
        ({"glob": 5}, "glob"),
        ({"workflow": "."}, "cannot be '.'"),
        ({"workflow": ".."}, "cannot be '..'"),
        ({"workflow": "a/b"}, "cannot contain '/'"),
        ({"workflow": "a\nb"}, "control character \\(U\\+000A\\)"),
        ({"workflow": "a\x7fb"}, "control character \\(U\\+007F\\)"),
        ({"workflow": 3}, "workflow"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_route_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"glob": "a/**", "workflow": "wf", **kwargs}
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(values, Route, strict=True)


@given(st.characters(codec="utf-8", categories=["Cc"]), st.text(max_size=5), st.text(max_size=5))
def test_no_control_character_in_a_workflow_name(char: str, before: str, after: str) -> None:
    problem = workflow_name_problem(before + char + after)
    assert problem is not None


@given(st.text(min_size=1, max_size=30))
def test_a_glob_that_validates_matches_some_file_the_runner_takes(glob: str) -> None:
    """The class behind ``glob = "/"``: a glob that passes validation compiles, and some path
    it matches is one the runner would take (not hidden, not a download in progress)."""
    if glob_problem(glob) is not None:
        with pytest.raises(ValueError, match="glob"):
            Route(glob=glob, workflow="wf")
        return
    route = Route(glob=glob, workflow="wf")
    sample = _a_path_matching(route.glob)
    if sample is not None:  # no sample for classes and escapes; the pattern still compiles
        assert not is_ignored(P(sample)), sample
        assert route_file(P(sample), [route]) is not None


def _a_path_matching(glob: str) -> str | None:
    """A path the glob matches, built by filling its wildcards; None if it has classes."""
    if any(char in glob for char in "[\\"):
        return None
    parts = [p for p in glob.lstrip("/").split("/") if p]
    if glob.endswith("/"):
        parts.append("f")
    filled = ["f" if p == "**" else p.replace("*", "x").replace("?", "y") for p in parts]
    path = "/".join(filled)
    return path if glob_matches(glob, path) else None


# -- default routing --------------------------------------------------------------------------


def test_default_routing_single_file() -> None:
    assert route_file(P("invoice-extract/a.pdf"), []) == Destination(
        "invoice-extract", "file", "invoice-extract/a.pdf", "a.pdf"
    )


def test_default_routing_folder_is_one_batch() -> None:
    assert route_file(P("wf/batch1/sub/a.pdf"), ()) == Destination(
        "wf", "folder", "wf/batch1", "sub/a.pdf"
    )
    assert route_file(P("wf/batch1/b.pdf"), ()) == Destination("wf", "folder", "wf/batch1", "b.pdf")


def test_default_routing_ignores_the_inbox_root() -> None:
    assert route_file(P("a.pdf"), []) is None


def test_default_routing_takes_the_workflow_name_verbatim() -> None:
    destination = route_file(P("My Workflow v2/a.pdf"), [])
    assert destination is not None
    assert destination.workflow == "My Workflow v2"


@pytest.mark.parametrize("rel", ["/abs/a.pdf", ".", "", "wf/../a.pdf", "../wf/a.pdf"])
def test_route_file_refuses_paths_outside_the_inbox(rel: str) -> None:
    with pytest.raises(ValueError, match="not a file path inside the inbox"):
        route_file(P(rel), [])
    with pytest.raises(ValueError, match="not a file path inside the inbox"):
        route_file(P(rel), [Route(glob="**", workflow="wf")])


paths = st.lists(name.filter(lambda n: n not in (".", "..")), min_size=1, max_size=6)


@given(parts=paths)
def test_default_routing_invariants(parts: list[str]) -> None:
    rel = P(*parts)
    destination = route_file(rel, [])
    if len(parts) == 1:
        assert destination is None
        return
    assert destination is not None
    assert destination.workflow == parts[0]
    if len(parts) == 2:
        assert destination.mode == "file"
        assert destination.batch_key == rel.as_posix()
        assert destination.item_reference_id == rel.name
    else:
        assert destination.mode == "folder"
        assert destination.batch_key == f"{parts[0]}/{parts[1]}"
        assert f"{destination.batch_key}/{destination.item_reference_id}" == rel.as_posix()


# -- configured routes ------------------------------------------------------------------------


def test_first_matching_route_wins() -> None:
    routes = [
        Route(glob="invoices/**/*.pdf", workflow="invoice-pdf"),
        Route(glob="invoices/**", workflow="invoice-any"),
        Route(glob="**", workflow="catch-all"),
    ]
    assert route_file(P("invoices/x/a.pdf"), routes) == Destination(
        "invoice-pdf", "file", "invoices/x/a.pdf", "a.pdf"
    )
    assert route_file(P("invoices/x/a.png"), routes) == Destination(
        "invoice-any", "file", "invoices/x/a.png", "a.png"
    )
    assert route_file(P("a.png"), routes) == Destination("catch-all", "file", "a.png", "a.png")


def test_no_matching_route_is_none() -> None:
    assert route_file(P("receipts/a.pdf"), [Route(glob="invoices/**", workflow="inv")]) is None


def test_folder_mode_groups_by_the_first_folder_below_the_literal_prefix() -> None:
    routes = [Route(glob="batches/**", workflow="batcher", group="folder")]
    assert route_file(P("batches/b1/x/y.pdf"), routes) == Destination(
        "batcher", "folder", "batches/b1", "x/y.pdf"
    )
    assert route_file(P("batches/b1/y.pdf"), routes) == Destination(
        "batcher", "folder", "batches/b1", "y.pdf"
    )
    # directly in the prefix folder: no batch folder, sent on its own
    assert route_file(P("batches/loose.pdf"), routes) == Destination(
        "batcher", "file", "batches/loose.pdf", "loose.pdf"
    )


def test_folder_mode_with_a_deeper_literal_prefix() -> None:
    routes = [Route(glob="in/scans/*/**", workflow="scan", group="folder")]
    assert route_file(P("in/scans/2024/box7/p1.png"), routes) == Destination(
        "scan", "folder", "in/scans/2024", "box7/p1.png"
    )
    assert route_file(P("in/scans/2024"), routes) == Destination(
        "scan", "file", "in/scans/2024", "2024"
    )


def test_folder_mode_with_a_wildcard_first_component() -> None:
    routes = [Route(glob="**/*.pdf", workflow="pdfs", group="folder")]
    assert route_file(P("a/b/c.pdf"), routes) == Destination("pdfs", "folder", "a", "b/c.pdf")
    assert route_file(P("c.pdf"), routes) == Destination("pdfs", "file", "c.pdf", "c.pdf")


def test_window_mode_groups_by_route_index() -> None:
    routes = [
        Route(glob="invoices/**", workflow="inv"),
        Route(glob="loose/**", workflow="bulk", group="window"),
    ]
    assert route_file(P("loose/a/b.pdf"), routes) == Destination(
        "bulk", "window", "window:1", "loose/a/b.pdf"
    )
    assert route_file(P("loose/c.pdf"), routes) == Destination(
        "bulk", "window", "window:1", "loose/c.pdf"
    )


def test_file_mode_under_a_folder_glob_keeps_each_file_separate() -> None:
    routes = [Route(glob="batches/**", workflow="w", group="file")]
    assert route_file(P("batches/b1/x/y.pdf"), routes) == Destination(
        "w", "file", "batches/b1/x/y.pdf", "y.pdf"
    )


GLOBS = ["**", "a/**", "a/*", "*/b/**", "**/*.pdf", "a/b/**", "[ab]/**", "?/*", "a/**/c"]
route_strategy = st.builds(
    Route,
    glob=st.sampled_from(GLOBS),
    workflow=st.sampled_from(["w1", "w2", "w3"]),
    group=st.sampled_from(["file", "folder", "window"]),
)
route_paths = st.lists(st.sampled_from(["a", "b", "c", "x.pdf", "y.png"]), min_size=1, max_size=5)


def literal_prefix_length(glob: str) -> int:
    count = 0
    for component in glob.split("/"):
        if any(char in component for char in "*?["):
            break
        count += 1
    return count


@given(routes=st.lists(route_strategy, min_size=1, max_size=4), parts=route_paths)
def test_routing_invariants(routes: list[Route], parts: list[str]) -> None:
    rel = P(*parts)
    path = rel.as_posix()
    destination = route_file(rel, routes)
    matching = [i for i, route in enumerate(routes) if glob_matches(route.glob, rel)]
    if not matching:
        assert destination is None
        return
    assert destination is not None
    index = matching[0]
    route = routes[index]
    assert destination.workflow == route.workflow
    if route.group == "window":
        assert destination == Destination(route.workflow, "window", f"window:{index}", path)
    elif destination.mode == "folder":
        assert route.group == "folder"
        depth = literal_prefix_length(route.glob) + 1
        assert destination.batch_key == "/".join(parts[:depth])
        assert f"{destination.batch_key}/{destination.item_reference_id}" == path
        assert len(parts) > depth
    else:
        assert destination == Destination(route.workflow, "file", path, rel.name)
        if route.group == "folder":
            assert len(parts) <= literal_prefix_length(route.glob) + 1


@given(parts=route_paths)
def test_every_file_in_one_folder_batch_shares_the_batch_key(parts: list[str]) -> None:
    routes = [Route(glob="a/**", workflow="w", group="folder")]
    sibling = P("a", "b", *parts)
    destination = route_file(sibling, routes)
    assert destination is not None
    assert destination.batch_key == "a/b"
    assert destination.item_reference_id == "/".join(parts)
