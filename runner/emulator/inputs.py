"""Request bodies of the call-creating endpoints, validated and reduced to file metadata.

Both the JSON form (base64 ``inputContent``) and multipart uploads end up as a
:class:`CallInput`: per file its type, reference and a :class:`ContentDigest` (size, sha256,
a short excerpt, which trigger markers it contains). The file bytes themselves are never kept;
multipart uploads are hashed chunk by chunk from Starlette's spooled temporary files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import msgspec
from starlette.datastructures import FormData, UploadFile

from runner.emulator.errors import InvalidRequest

# The SDK's InputType values; "jpg" is an undeclared alias the API accepts as well.
INPUT_TYPES: frozenset[str] = frozenset(
    {
        "csv", "docx", "email", "heic", "heif", "html", "jfif", "jpeg", "json", "m4a", "mov",
        "mp3", "mp4", "pdf", "png", "pptx", "text", "wav", "webp", "xls", "xlsx", "xml",
    }
)  # fmt: skip
INPUT_TYPE_ALIASES: Mapping[str, str] = {"jpg": "jpeg", "jfif": "jpeg"}
TEXT_INPUT_TYPES: frozenset[str] = frozenset({"csv", "email", "html", "json", "text", "xml"})
EXTENSION_INPUT_TYPES: Mapping[str, str] = {
    "csv": "csv", "docx": "docx", "eml": "email", "heic": "heic", "heif": "heif",
    "htm": "html", "html": "html", "jfif": "jpeg", "jpeg": "jpeg", "jpg": "jpeg",
    "json": "json", "m4a": "m4a", "mov": "mov", "mp3": "mp3", "mp4": "mp4", "pdf": "pdf",
    "png": "png", "pptx": "pptx", "txt": "text", "wav": "wav", "webp": "webp", "xls": "xls",
    "xlsx": "xlsx", "xml": "xml",
}  # fmt: skip

FAIL_MARKER = b"BEM-EMULATOR-FAIL"
INVALID_MARKER = b"BEM-EMULATOR-INVALID"
METADATA_MAX_BYTES = 4096
EXCERPT_HEAD_BYTES = 256
EXCERPT_WORDS = 8
UPLOAD_CHUNK_BYTES = 64 * 1024

_MARKER_OVERLAP = max(len(FAIL_MARKER), len(INVALID_MARKER)) - 1
_CALL_FIELDS = frozenset({"input", "callReferenceID", "metadata", "bucket"})
_FORM_FIELDS = frozenset(
    {"file", "files", "inputType", "callReferenceID", "wait", "metadata", "bucket"}
)


class ContentDigest(msgspec.Struct, frozen=True):
    size: int
    sha256: str
    excerpt: str | None
    contains_fail_marker: bool
    contains_invalid_marker: bool


class ItemInput(msgspec.Struct, frozen=True):
    input_type: str
    item_reference_id: str | None
    digest: ContentDigest


class CallInput(msgspec.Struct, frozen=True):
    items: tuple[ItemInput, ...]
    batch: bool
    call_reference_id: str | None = None
    metadata: dict[str, Any] | None = None
    bucket: str | None = None


class Digester:
    """Hashes content chunk by chunk and spots the trigger markers across chunk borders."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._head = b""
        self._tail = b""
        self._fail = False
        self._invalid = False

    def update(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        self._size += len(chunk)
        if len(self._head) < EXCERPT_HEAD_BYTES:
            self._head += chunk[: EXCERPT_HEAD_BYTES - len(self._head)]
        window = self._tail + chunk
        self._fail = self._fail or FAIL_MARKER in window
        self._invalid = self._invalid or INVALID_MARKER in window
        self._tail = window[-_MARKER_OVERLAP:]

    def finish(self, input_type: str) -> ContentDigest:
        excerpt = None
        if input_type in TEXT_INPUT_TYPES:
            words = self._head.decode("utf-8", errors="replace").split()
            excerpt = " ".join(words[:EXCERPT_WORDS])
        return ContentDigest(
            size=self._size,
            sha256=self._sha256.hexdigest(),
            excerpt=excerpt,
            contains_fail_marker=self._fail,
            contains_invalid_marker=self._invalid,
        )


# ---------------------------------------------------------------------------------------------
# JSON bodies


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    return require_object(data, "request body")


def parse_call_fields(
    fields: Mapping[str, Any], where: str = "", *, other_fields: frozenset[str] = frozenset()
) -> CallInput:
    """The shared part of a v3 body and a v2 ``calls[]`` entry: input, reference, metadata."""
    reject_unknown(fields, _CALL_FIELDS | other_fields, where.rstrip(".") or "request body")
    if "input" not in fields:
        raise InvalidRequest(f"{where}input: required")
    items, batch = _parse_input(require_object(fields["input"], f"{where}input"), f"{where}input")
    return CallInput(
        items=items,
        batch=batch,
        call_reference_id=optional_string(fields, "callReferenceID", where),
        metadata=parse_metadata(fields.get("metadata"), f"{where}metadata"),
        bucket=optional_string(fields, "bucket", where),
    )


def _parse_input(value: Mapping[str, Any], where: str) -> tuple[tuple[ItemInput, ...], bool]:
    reject_unknown(value, frozenset({"singleFile", "batchFiles"}), where)
    present = [key for key in ("singleFile", "batchFiles") if value.get(key) is not None]
    if len(present) != 1:
        raise InvalidRequest(f"{where}: provide exactly one of singleFile or batchFiles")
    if present[0] == "singleFile":
        single = require_object(value["singleFile"], f"{where}.singleFile")
        return (_parse_file(single, f"{where}.singleFile", batch=False),), False
    batch = require_object(value["batchFiles"], f"{where}.batchFiles")
    reject_unknown(batch, frozenset({"inputs"}), f"{where}.batchFiles")
    inputs = batch.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest(f"{where}.batchFiles.inputs: must be a non-empty array")
    items = tuple(
        _parse_file(require_object(entry, f"{where}.batchFiles.inputs[{index}]"),
                    f"{where}.batchFiles.inputs[{index}]", batch=True)
        for index, entry in enumerate(inputs)
    )  # fmt: skip
    return items, True


def _parse_file(value: Mapping[str, Any], where: str, *, batch: bool) -> ItemInput:
    allowed = {"inputContent", "inputType"} | ({"itemReferenceID"} if batch else set())
    reject_unknown(value, frozenset(allowed), where)
    input_type = normalize_input_type(value.get("inputType"), f"{where}.inputType")
    content = value.get("inputContent")
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.inputContent: required, a base64 string")
    item_reference_id = optional_string(value, "itemReferenceID", f"{where}.") if batch else None
    digester = Digester()
    digester.update(decode_base64(content, f"{where}.inputContent"))
    return _checked_item(input_type, item_reference_id, digester.finish(input_type), where)


def decode_base64(value: str, where: str) -> bytes:
    try:
        # Line breaks are tolerated, as MIME encoders insert them every 76 characters.
        return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except binascii.Error as exc:
        raise InvalidRequest(f"{where}: not valid base64 ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# multipart bodies


async def parse_form(form: FormData) -> tuple[CallInput, bool | None]:
    """A multipart call: ``file`` (singleFile) or ``files`` (batchFiles), plus options."""
    reject_unknown(form, _FORM_FIELDS, "form")
    singles, several = form.getlist("file"), form.getlist("files")
    if bool(singles) == bool(several) or len(singles) > 1:
        raise InvalidRequest("form: provide exactly one 'file' field or one or more 'files' fields")
    declared_type = _form_text(form, "inputType")
    uploads = [
        _require_upload(value, "file" if singles else "files") for value in singles or several
    ]
    items = tuple(
        [await _digest_upload(upload, declared_type, batch=bool(several)) for upload in uploads]
    )
    metadata_text = _form_text(form, "metadata")
    wait_text = _form_text(form, "wait")
    call = CallInput(
        items=items,
        batch=bool(several),
        call_reference_id=_form_text(form, "callReferenceID"),
        metadata=None if metadata_text is None else _parse_metadata_text(metadata_text),
        bucket=_form_text(form, "bucket"),
    )
    return call, None if wait_text is None else parse_bool(wait_text, "form field wait")


async def _digest_upload(
    upload: UploadFile, declared_type: str | None, *, batch: bool
) -> ItemInput:
    filename = upload.filename or ""
    where = f"form file {filename!r}"
    if declared_type is not None:
        input_type = normalize_input_type(declared_type, "form field inputType")
    else:
        input_type = input_type_for_filename(filename, where)
    digester = Digester()
    while chunk := await upload.read(UPLOAD_CHUNK_BYTES):
        digester.update(chunk)
    item_reference_id = (filename or None) if batch else None
    return _checked_item(input_type, item_reference_id, digester.finish(input_type), where)


def _require_upload(value: UploadFile | str, field: str) -> UploadFile:
    if not isinstance(value, UploadFile):
        raise InvalidRequest(f"form field {field}: must be a file upload, not text")
    return value


def _form_text(form: FormData, field: str) -> str | None:
    values = form.getlist(field)
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise InvalidRequest(f"form field {field}: must be given once, as text")
    return values[0]


def _parse_metadata_text(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"form field metadata: not valid JSON ({exc})") from exc
    return parse_metadata(value, "form field metadata")


# ---------------------------------------------------------------------------------------------
# shared checks


def _checked_item(
    input_type: str, item_reference_id: str | None, digest: ContentDigest, where: str
) -> ItemInput:
    if digest.size == 0:
        raise InvalidRequest(f"{where}: the file is empty")
    if digest.contains_invalid_marker:
        raise InvalidRequest(f"{where}: content contains {INVALID_MARKER.decode()}")
    return ItemInput(input_type=input_type, item_reference_id=item_reference_id, digest=digest)


def normalize_input_type(value: object, where: str) -> str:
    """The input type as bem's spec enumerates it: lower case only (``PDF`` is a 400)."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}: required, one of {', '.join(sorted(INPUT_TYPES))}")
    if value in INPUT_TYPE_ALIASES:
        return INPUT_TYPE_ALIASES[value]
    if value not in INPUT_TYPES:
        raise InvalidRequest(
            f"{where}: {value!r} is not a supported input type "
            f"(one of {', '.join(sorted(INPUT_TYPES))}, in lower case)"
        )
    return value


def input_type_for_filename(filename: str, where: str) -> str:
    extension = PurePosixPath(filename).suffix.lower().lstrip(".")
    if extension not in EXTENSION_INPUT_TYPES:
        raise InvalidRequest(
            f"{where}: cannot tell the input type from the extension {extension!r}; "
            "send an inputType field"
        )
    return EXTENSION_INPUT_TYPES[extension]


def parse_metadata(value: object, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    metadata = require_object(value, where)
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > METADATA_MAX_BYTES:
        raise InvalidRequest(f"{where}: {size} bytes, more than the {METADATA_MAX_BYTES} allowed")
    return metadata


def parse_bool(value: str, where: str) -> bool:
    """A boolean as the SDK writes one: exactly ``true`` or ``false``."""
    if value == "true":
        return True
    if value == "false":
        return False
    raise InvalidRequest(f"{where}: {value!r} is not a boolean (true or false)")


def require_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: must be a JSON object")
    return value


def optional_string(fields: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{where}{key}: must be a string")
    return value


def reject_unknown(fields: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(fields.keys()) - allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(unknown)}")
