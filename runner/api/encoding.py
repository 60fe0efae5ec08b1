"""How the client writes requests, the way bem's official SDK (``bem-sdk``) writes them.

- Path parameters are percent-encoded as one RFC 3986 segment (the SDK's ``path_template``), and
  a value that would make a dot-segment (``.``, ``..``) or an empty segment is refused: the
  URL would silently point at another route.
- Array query parameters go as ONE key with comma-joined values (``callIDs=a,b``), as the SDK's
  ``Querystring(array_format="comma")`` sends them; a value that itself holds a comma cannot be
  told apart from two values and is refused.
- JSON bodies are built as byte strings and streamed with their length; file content is read
  and base64-encoded when the body is built, so it can be sent again (a 307/308 redirect).
- Multipart uploads name each file by its item reference only when every server reads that
  name back exactly; otherwise the call goes as JSON, which carries any name losslessly.
- Header values (the API key) must be visible ASCII, spaces and tabs inside allowed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import mimetypes
import re
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import msgspec

from runner import names
from runner.api.models import UploadFile
from runner.errors import NotFoundError, PermanentError

__all__ = [
    "FileContent",
    "PartsStream",
    "call_id_segment",
    "content_type_for",
    "encode_json",
    "form_filename",
    "header_value_problem",
    "input_document",
    "item_reference_id",
    "list_query",
    "multipart_can_carry",
    "workflow_segment",
]

# A multiple of 3, so base64 of consecutive chunks concatenates to base64 of the whole file.
READ_CHUNK_BYTES = 3 * 256 * 1024

# RFC 3986 pchar minus "/": what the SDK leaves unescaped in a path segment.
_SEGMENT_SAFE = "!$&'()*+,;=:@"
_DOT_SEGMENT = re.compile(r"^(?:\.|%2[eE]){1,2}$")
# RFC 9110 field-value: visible ASCII, with spaces and tabs only between visible characters.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?")
# A multipart filename every server decodes back exactly: printable ASCII without the
# characters encoders escape in different ways (" \ %) and without "/" (some servers keep
# only the last path component).
_PORTABLE_FILENAME = re.compile(r"[\x20-\x7e]+")
_FILENAME_UNSAFE = frozenset('"\\%/')


# -- paths ---------------------------------------------------------------------------------------


def workflow_segment(name: str) -> str:
    """The workflow name as a path segment; PermanentError for a name no URL can address."""
    problem = _segment_problem(name)
    if problem is not None:
        raise PermanentError(
            f"workflow name {name!r} cannot be sent: {problem}; fix the route's workflow"
        )
    return _quote_segment(name)


def call_id_segment(call_id: str) -> str:
    """The call ID as a path segment; NotFoundError for an ID no URL can address."""
    problem = _segment_problem(call_id)
    if problem is not None:
        raise NotFoundError(f"no call can be read by the ID {call_id!r}: {problem}")
    return _quote_segment(call_id)


def _segment_problem(value: str) -> str | None:
    if not value:
        return "it is empty"
    if _DOT_SEGMENT.match(_quote_segment(value)):
        return "'.' and '..' are path navigation, not names"
    return None


def _quote_segment(value: str) -> str:
    return urllib.parse.quote(value, safe=_SEGMENT_SAFE)


# -- query strings -------------------------------------------------------------------------------


def list_query(filters: Mapping[str, Sequence[str] | str | int | None]) -> httpx.QueryParams:
    """Query parameters with arrays as one comma-joined key; None and empty arrays left out."""
    params: list[tuple[str, str]] = []
    for key, value in filters.items():
        if value is None:
            continue
        if isinstance(value, str | int):
            params.append((key, str(value)))
            continue
        items = list(value)
        for item in items:
            if "," in item or not item:
                raise PermanentError(
                    f"query parameter {key}: {item!r} cannot be sent in a comma-joined list"
                )
        if items:
            params.append((key, ",".join(items)))
    return httpx.QueryParams(tuple(params))


# -- headers -------------------------------------------------------------------------------------


def header_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as an HTTP header value, or None. Never quotes the value."""
    if _HEADER_VALUE.fullmatch(value) is not None:
        return None
    if not value.strip():
        return "it is empty"
    if value != value.strip(" \t"):
        return "it starts or ends with white space"
    if any(ord(char) > 0x7E for char in value):
        return "it holds characters that are not ASCII"
    return "it holds control characters (a line break, perhaps)"


# -- JSON bodies ---------------------------------------------------------------------------------


class FileContent(msgspec.Struct, frozen=True):
    """Stands for a file's base64 content in a JSON document until the body is encoded."""

    path: Path


class PartsStream(httpx.AsyncByteStream):
    """A request body sent as the byte strings it was built from; can be sent again."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    @property
    def length(self) -> int:
        return sum(len(part) for part in self._parts)

    def joined(self) -> bytes:
        """The whole body as one byte string (a copy: for small bodies only)."""
        return b"".join(self._parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part


class _BodyWriter:
    """Collects a body as byte strings: small pieces are merged, large ones kept as they are."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pending = bytearray()

    def small(self, data: bytes) -> None:
        self._pending += data

    def large(self, data: bytes) -> None:
        self._flush()
        self._parts.append(data)

    def finish(self) -> list[bytes]:
        self._flush()
        return self._parts

    def _flush(self) -> None:
        if self._pending:
            self._parts.append(bytes(self._pending))
            self._pending.clear()


def encode_json(document: Mapping[str, object]) -> PartsStream:
    """``document`` as compact JSON, its :class:`FileContent` read and base64-encoded now."""
    writer = _BodyWriter()
    _write_json(document, writer)
    return PartsStream(writer.finish())


def _write_json(value: object, writer: _BodyWriter) -> None:
    if isinstance(value, FileContent):
        writer.small(b'"')
        with value.path.open("rb") as handle:
            while chunk := handle.read(READ_CHUNK_BYTES):
                writer.large(base64.b64encode(chunk))
        writer.small(b'"')
    elif isinstance(value, Mapping):
        writer.small(b"{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                writer.small(b",")
            writer.small(_json_bytes(str(key)) + b":")
            _write_json(item, writer)
        writer.small(b"}")
    elif isinstance(value, list):
        writer.small(b"[")
        for index, item in enumerate(value):
            if index:
                writer.small(b",")
            _write_json(item, writer)
        writer.small(b"]")
    else:
        writer.small(_json_bytes(value))


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""One encoder for every value: ``json.dumps`` with these options would build one per call."""


def _json_bytes(value: object) -> bytes:
    return _COMPACT_JSON.encode(value).encode("ascii")


def input_document(files: Sequence[UploadFile], *, batch: bool) -> dict[str, object]:
    """The ``input`` member of a call: ``singleFile`` or ``batchFiles``."""
    if batch:
        inputs = [_file_document(file, item_reference=True) for file in files]
        return {"batchFiles": {"inputs": inputs}}
    return {"singleFile": _file_document(files[0], item_reference=False)}


def _file_document(file: UploadFile, *, item_reference: bool) -> dict[str, object]:
    document: dict[str, object] = {"inputType": file.input_type}
    if item_reference:
        document["itemReferenceID"] = item_reference_id(file)
    document["inputContent"] = FileContent(file.path)
    return document


def item_reference_id(file: UploadFile) -> str:
    """The file's reference inside a batch, always valid Unicode (see :mod:`runner.names`)."""
    reference = file.item_reference_id if file.item_reference_id is not None else file.path.name
    return names.shown(reference)


@contextlib.contextmanager
def reading_input_files() -> Iterator[None]:
    """An input file that cannot be read fails the request before anything is sent."""
    try:
        yield
    except OSError as exc:
        raise PermanentError(f"cannot read input file: {exc}") from exc


# -- multipart bodies ----------------------------------------------------------------------------


def multipart_can_carry(files: Sequence[UploadFile], *, batch: bool) -> bool:
    """Whether a multipart form carries this call exactly: in a batch, each file's name is its
    itemReferenceID, so every name must be :func:`portable_filename`."""
    if not batch:
        return True
    return all(portable_filename(item_reference_id(file)) for file in files)


def portable_filename(name: str) -> bool:
    """A ``filename=`` every multipart encoder and decoder leaves as it is."""
    return _PORTABLE_FILENAME.fullmatch(name) is not None and not (_FILENAME_UNSAFE & set(name))


def form_filename(file: UploadFile, *, batch: bool) -> str:
    """The ``filename=`` of a file part: its item reference in a batch, else its shown name."""
    return item_reference_id(file) if batch else names.shown(file.path.name)


def content_type_for(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(names.shown(path.name))
    return guessed or "application/octet-stream"
