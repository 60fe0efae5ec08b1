"""The receiver over real HTTP: only bem's signed events are recorded; everything else is
refused with no detail, never recorded, and never changes a document."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from runner.webhook import MAX_BODY_BYTES, sign
from tests.conftest import free_port
from tests.webhook_helpers import (
    PREVIOUS_SECRET,
    SECRET,
    event_states,
    hook_config,
    running,
)

pytestmark = pytest.mark.anyio

PATH = "/bem/webhook"


def event(event_id: str = "evt_1", call_id: str = "call_unknown") -> bytes:
    body = {"eventID": event_id, "eventType": "transform", "callID": call_id, "referenceID": "r"}
    return json.dumps(body).encode()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    port = free_port()
    config = hook_config(
        tmp_path,
        "http://127.0.0.1:9",  # never reached: no files
        port,
        environ={"BEM_WEBHOOK_PREVIOUS_SECRET": PREVIOUS_SECRET},
    )
    async with (
        running(config),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        yield http, tmp_path


async def post(http: httpx.AsyncClient, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["bem-signature"] = signature
    return await http.post(PATH, content=body, headers=headers)


def now() -> int:
    return int(time.time())


def forged_requests() -> list[tuple[str, bytes, str | None]]:
    body = event()
    t = now()
    good = sign(SECRET, t, body)
    mac = good.split("v1=")[1]
    return [
        ("unsigned", body, None),
        ("empty header", body, ""),
        ("garbled header", body, "garbage"),
        ("no v1", body, f"t={t}"),
        ("no t", body, f"v1={mac}"),
        ("two t", body, f"t={t},t={t},v1={mac}"),
        ("short mac", body, f"t={t},v1={mac[:-2]}"),
        ("non-hex mac", body, f"t={t},v1={'z' * 64}"),
        ("non-digit t", body, f"t=12a,v1={mac}"),
        ("forged mac", body, f"t={t},v1={'0' * 64}"),
        ("wrong secret", body, sign("whsec_someone-else", t, body)),
        # An hour out, not one second past the 300 s tolerance: the receiver reads the real clock,
        # which moves on while the requests before these are answered (the exact bounds are
        # tests/test_webhook_units.py's, on a fixed clock).
        ("stale", body, sign(SECRET, t - 3600, body)),
        ("future", body, sign(SECRET, t + 3600, body)),
        ("tampered body", body.replace(b"call_unknown", b"call_other01"), good),
        ("appended byte", body + b" ", good),
        ("v0 only", body, f"t={t},v0={mac}"),
    ]


async def test_forged_stale_tampered_and_unsigned_deliveries_are_refused(
    receiver: tuple[httpx.AsyncClient, Path],
) -> None:
    http, root = receiver
    with capture_logs() as logs:
        for label, body, signature in forged_requests():
            response = await post(http, body, signature)
            assert response.status_code == 401, label
            assert response.content == b"", label
    assert event_states(root / "state.db") == {}
    refusals = [entry for entry in logs if entry["event"] == "webhook refused"]
    assert len(refusals) == len(forged_requests())
    assert {entry["log_level"] for entry in refusals} == {"warning"}
    assert all(b"call_unknown" not in repr(entry).encode() for entry in refusals)
    assert list((root / "outbox").rglob("*")) == []


async def test_signed_events_are_recorded_once_under_either_secret(
    receiver: tuple[httpx.AsyncClient, Path],
) -> None:
    http, root = receiver
    body = event("evt_a")
    assert (await post(http, body, sign(SECRET, now(), body))).status_code == 200
    assert (await post(http, body, sign(SECRET, now(), body))).status_code == 200  # again
    rotated = event("evt_b")
    assert (await post(http, rotated, sign(PREVIOUS_SECRET, now(), rotated))).status_code == 200
    both = event("evt_c")
    t = now()
    header = f"t={t},v1={'0' * 64},v1={sign(SECRET, t, both).split('v1=')[1]}"
    assert (await post(http, both, header)).status_code == 200  # any v1 entry may match
    assert event_states(root / "state.db") == {"pending": 3}  # calls this runner never made


async def test_only_post_to_the_path_and_bounded_bodies(
    receiver: tuple[httpx.AsyncClient, Path],
) -> None:
    http, root = receiver
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        response = await http.request(method, PATH)
        assert response.status_code == 405, method
        assert response.headers["allow"] == "POST"
    assert (await http.post("/elsewhere", content=event())).status_code == 404
    big = b'{"eventID": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert (await post(http, big, sign(SECRET, now(), big))).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(11):
            yield b"x" * 100_000

    streamed = await http.post(PATH, content=chunks())
    assert streamed.status_code == 413
    not_event = b'["a list"]'
    assert (await post(http, not_event, sign(SECRET, now(), not_event))).status_code == 400
    assert event_states(root / "state.db") == {}


async def test_the_secret_appears_in_no_log_line(
    receiver: tuple[httpx.AsyncClient, Path],
) -> None:
    http, root = receiver
    with capture_logs() as logs:
        body = event("evt_log")
        await post(http, body, sign(SECRET, now(), body))
        await post(http, body, sign("whsec_wrong", now(), body))
    text = repr(logs)
    assert SECRET not in text
    assert PREVIOUS_SECRET not in text
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
