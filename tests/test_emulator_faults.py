"""Fault injection (rate limit, 5xx, accept-then-500, drops, slow responses) and real serving."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any

import anyio
import httpx
import pytest

from runner.emulator import Emulator, EmulatorError, serve_emulator
from runner.emulator.faults import ConnectionDropped

from .conftest import frozen_emulator

pytestmark = pytest.mark.anyio

KEY = "test-key"
AUTH = {"x-api-key": KEY}
INVOKE = "/v3/workflows/invoices/call"
INVOKE_ROUTE = "POST /v3/workflows/{workflowName}/call"


def single(content: bytes = b"%PDF invoice", **extra: Any) -> dict[str, Any]:
    encoded = base64.b64encode(content).decode()
    return {"input": {"singleFile": {"inputContent": encoded, "inputType": "pdf"}}, **extra}


make_emulator = partial(frozen_emulator, frozen_at=50.0, latency=1.0, api_key=KEY)


async def open_client(emulator: Emulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=emulator.app), base_url="http://emulator.test"
    )


@pytest.fixture
async def limited() -> AsyncIterator[tuple[Emulator, httpx.AsyncClient]]:
    emulator = make_emulator(rate_limit_rps=1.0, rate_limit_burst=2)
    async with await open_client(emulator) as client:
        yield emulator, client


# ---------------------------------------------------------------------------------------------
# rate limit


async def test_empty_bucket_answers_429_with_retry_after_and_does_nothing_else(
    limited: tuple[Emulator, httpx.AsyncClient],
) -> None:
    emulator, client = limited
    assert (await client.post(INVOKE, json=single(), headers=AUTH)).status_code == 202
    assert (await client.post(INVOKE, json=single(), headers=AUTH)).status_code == 202

    refused = await client.post(INVOKE, json=single(callReferenceID="refused"), headers=AUTH)

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert "rate limit" in refused.json()["error"]
    stats = emulator.stats()
    assert stats["calls_total"] == 2
    assert "refused" not in stats["calls_by_reference"]
    assert stats["rate_limited"] == 1
    assert stats["requests"][INVOKE_ROUTE] == {"202": 2, "429": 1}


async def test_bucket_refills_as_emulator_time_advances(
    limited: tuple[Emulator, httpx.AsyncClient],
) -> None:
    emulator, client = limited
    for _ in range(2):
        await client.get("/v3/calls", headers=AUTH)
    assert (await client.get("/v3/calls", headers=AUTH)).status_code == 429
    emulator.advance(1.0)
    assert (await client.get("/v3/calls", headers=AUTH)).status_code == 200
    assert (await client.get("/v3/calls", headers=AUTH)).status_code == 429
    emulator.advance(10.0)  # refills up to the burst only
    statuses = [(await client.get("/v3/calls", headers=AUTH)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_control_routes_and_rejected_keys_spend_no_tokens(
    limited: tuple[Emulator, httpx.AsyncClient],
) -> None:
    _, client = limited
    for _ in range(5):
        assert (await client.get("/_emulator/stats")).status_code == 200
        assert (await client.get("/v3/calls", headers={"x-api-key": "bad"})).status_code == 401
    assert (await client.get("/v3/calls", headers=AUTH)).status_code == 200


async def test_retry_after_seconds_round_up() -> None:
    emulator = make_emulator(rate_limit_rps=0.4, rate_limit_burst=1)
    async with await open_client(emulator) as client:
        await client.get("/v3/calls", headers=AUTH)
        response = await client.get("/v3/calls", headers=AUTH)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"  # 2.5 s until the next token


async def test_retry_after_as_http_date() -> None:
    emulator = make_emulator(rate_limit_rps=0.5, rate_limit_burst=1, retry_after_format="http-date")
    async with await open_client(emulator) as client:
        await client.get("/v3/calls", headers=AUTH)
        before = time.time()
        response = await client.get("/v3/calls", headers=AUTH)
        after = time.time()
    assert response.status_code == 429
    retry_at = parsedate_to_datetime(response.headers["Retry-After"])
    assert response.headers["Retry-After"].endswith(" GMT")
    assert retry_at.utcoffset() == timedelta(0)
    assert before + 2.0 <= retry_at.timestamp() <= after + 3.0


async def test_a_retry_after_date_moves_with_emulator_time() -> None:
    """Advancing the emulator moves its calendar too: the date says the same wait as the
    seconds form, so a runner whose clock moved as far reads it right."""
    emulator = make_emulator(rate_limit_rps=0.5, rate_limit_burst=1, retry_after_format="http-date")
    emulator.advance(3600.0)
    async with await open_client(emulator) as client:
        await client.get("/v3/calls", headers=AUTH)
        before = time.time()
        response = await client.get("/v3/calls", headers=AUTH)
        after = time.time()
    assert response.status_code == 429
    retry_at = parsedate_to_datetime(response.headers["Retry-After"]).timestamp()
    assert before + 3600.0 + 2.0 <= retry_at <= after + 3600.0 + 3.0


async def test_changing_the_rate_limit_at_runtime(
    limited: tuple[Emulator, httpx.AsyncClient],
) -> None:
    emulator, client = limited
    for _ in range(2):
        await client.get("/v3/calls", headers=AUTH)
    assert (await client.get("/v3/calls", headers=AUTH)).status_code == 429
    emulator.update(rate_limit_rps=None)
    statuses = {(await client.get("/v3/calls", headers=AUTH)).status_code for _ in range(20)}
    assert statuses == {200}


# ---------------------------------------------------------------------------------------------
# 5xx, accept-then-500, drops, slow responses


async def test_5xx_answers_without_doing_anything() -> None:
    emulator = make_emulator(error_5xx_rate=1.0)
    async with await open_client(emulator) as client:
        post = await client.post(INVOKE, json=single(callReferenceID="r"), headers=AUTH)
        get = await client.get("/v3/calls", headers=AUTH)
    assert post.status_code in (500, 502, 503)
    assert get.status_code in (500, 502, 503)
    assert post.json() == {"error": "emulated server error"}
    stats = emulator.stats()
    assert stats["calls_total"] == 0
    assert stats["faults"]["error_5xx"] == 2
    assert stats["requests"][INVOKE_ROUTE] == {str(post.status_code): 1}


async def test_5xx_choice_is_deterministic_by_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        emulator = make_emulator(error_5xx_rate=0.5, seed=seed)
        async with await open_client(emulator) as client:
            return [(await client.get("/v3/calls", headers=AUTH)).status_code for _ in range(30)]

    first = await statuses(3)
    assert first == await statuses(3)
    assert first != await statuses(4)
    assert {200, 500, 502, 503} <= set(first)


async def test_accept_then_500_creates_the_call_then_answers_500() -> None:
    emulator = make_emulator(accept_then_500_rate=1.0)
    async with await open_client(emulator) as client:
        response = await client.post(INVOKE, json=single(callReferenceID="ghost"), headers=AUTH)
        listed = await client.get("/v3/calls", params={"referenceIDs": "ghost"}, headers=AUTH)
        v2 = await client.post(
            "/v2/calls",
            json={"calls": [{"workflowName": "w", "callReferenceID": "ghost-2", **single()}]},
            headers=AUTH,
        )
        invalid = await client.post(INVOKE, json={"input": {}}, headers=AUTH)
    assert response.status_code == 500
    assert "callID" not in response.text
    assert listed.status_code == 200
    assert [c["callReferenceID"] for c in listed.json()["calls"]] == ["ghost"]
    assert v2.status_code == 500
    assert invalid.status_code == 400  # only successful work is turned into a 500
    stats = emulator.stats()
    assert stats["calls_by_reference"] == {"ghost": 1, "ghost-2": 1}
    assert stats["faults"]["accept_then_500"] == 2


async def test_dropped_connection_through_asgi_transport_is_a_transport_error() -> None:
    emulator = make_emulator(drop_rate=1.0)
    async with await open_client(emulator) as client:
        with pytest.raises(httpx.TransportError):
            await client.post(INVOKE, json=single(callReferenceID="dropped"), headers=AUTH)
        with pytest.raises(httpx.TransportError):
            await client.get("/v3/calls", headers=AUTH)
        emulator.update(drop_rate=0.0)
        listed = await client.get("/v3/calls", params={"referenceIDs": "dropped"}, headers=AUTH)
    assert len(listed.json()["calls"]) == 1  # the dropped POST did create its call
    stats = emulator.stats()
    assert stats["requests"][INVOKE_ROUTE] == {"dropped": 1}
    assert stats["requests"]["GET /v3/calls"] == {"dropped": 1, "200": 1}
    assert stats["faults"]["dropped"] == 2


async def test_slow_response_is_held_until_emulator_time_passes() -> None:
    emulator = make_emulator(slow_rate=1.0, slow_seconds=5.0)
    responses: list[httpx.Response] = []
    async with await open_client(emulator) as client:

        async def post() -> None:
            responses.append(await client.post(INVOKE, json=single(), headers=AUTH))

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(post)
            await emulator.wait_blocked()
            assert responses == []
            assert emulator.stats()["calls_total"] == 1  # the work is done, the answer is late
            emulator.advance(5.0)
    assert responses[0].status_code == 202
    assert emulator.stats()["faults"]["slow"] == 1


# ---------------------------------------------------------------------------------------------
# real HTTP


async def test_serve_emulator_over_real_http_including_a_dropped_connection() -> None:
    emulator = make_emulator()
    async with serve_emulator(emulator) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        assert base_url.startswith("http://127.0.0.1:")
        created = await client.post(INVOKE, json=single(), headers=AUTH)
        assert created.status_code == 202

        emulator.update(drop_rate=1.0)
        with pytest.raises(httpx.RemoteProtocolError) as dropped:
            await client.post(INVOKE, json=single(callReferenceID="lost"), headers=AUTH)
        # A real socket-level drop, not the in-process exception.
        assert not isinstance(dropped.value, ConnectionDropped)
        emulator.update(drop_rate=0.0)

        listed = await client.get("/v3/calls", params={"referenceIDs": "lost"}, headers=AUTH)
        assert len(listed.json()["calls"]) == 1
        assert (await client.post("/_emulator/advance", json={"seconds": 1})).status_code == 200
        call = await client.get(f"/v3/calls/{created.json()['call']['callID']}", headers=AUTH)
        assert call.json()["call"]["status"] == "completed"
        stats = (await client.get("/_emulator/stats")).json()
    assert stats["requests"][INVOKE_ROUTE] == {"202": 1, "dropped": 1}


async def test_serve_emulator_on_a_busy_port_is_an_emulator_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmulatorError, match=str(port)):
            async with serve_emulator(make_emulator(), port=port):
                pass


# ---------------------------------------------------------------------------------------------
# knobs for the SDK's retry and response semantics, set over HTTP


async def test_answer_knobs_are_set_through_the_settings_route() -> None:
    emulator = make_emulator()
    async with await open_client(emulator) as client:
        created = (await client.post(INVOKE, json=single(), headers=AUTH)).json()["call"]
        call_path = f"/v3/calls/{created['callID']}"

        async def knobs(**changes: Any) -> None:
            response = await client.post("/_emulator/settings", json=changes)
            assert response.status_code == 200, response.text

        await knobs(error_rate=1.0, error_status=409, should_retry_header="false",
                    fault_retry_after=1.5, retry_after_format="milliseconds")  # fmt: skip
        conflict = await client.get(call_path, headers=AUTH)
        assert conflict.status_code == 409
        assert conflict.headers["x-should-retry"] == "false"
        assert conflict.headers["retry-after-ms"] == "1500"
        assert "retry-after" not in conflict.headers

        await knobs(error_rate=0.0, redirect_status=308)
        moved = await client.get("/v3/calls/a%2Fb", params={"limit": "1"}, headers=AUTH)
        assert moved.status_code == 308
        assert moved.headers["location"] == "/moved/v3/calls/a%2Fb?limit=1"
        followed = await client.get("/moved" + call_path, headers=AUTH)
        assert followed.json()["call"]["callID"] == created["callID"]

        await knobs(redirect_status=None, null_call=True)
        assert (await client.get(call_path, headers=AUTH)).json() == {"call": None}

        await knobs(null_call=False, null_events=True)
        call = (await client.get(call_path, headers=AUTH)).json()["call"]
        assert (call["outputs"], call["errors"]) == (None, None)

        bad = await client.post("/_emulator/settings", json={"error_status": 200})
        assert bad.status_code == 400
        assert emulator.stats()["faults"]["redirected"] == 1
        assert emulator.stats()["faults"]["error"] == 1
