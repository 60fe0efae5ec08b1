"""The emulator against the official bem SDK: its client, and its models in strict mode.

Raw JSON is validated with ``model_validate_json(..., strict=True)``: strict validation of JSON
text accepts ISO 8601 strings for datetime fields, as JSON has no datetime type. Because the
SDK's models allow unknown fields, every validated model is also checked to carry none.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any, get_args

import bem
import httpx
import pytest
from bem.types import InputType
from bem.types.call import Call
from bem.types.call_get_response import CallGetResponse
from bem.types.call_retrieve_trace_response import CallRetrieveTraceResponse
from bem.types.error_event import ErrorEvent
from bem.types.event import TransformEvent
from pydantic import BaseModel

from runner.emulator import Emulator
from runner.emulator.inputs import INPUT_TYPES

from .conftest import frozen_emulator

pytestmark = pytest.mark.anyio

KEY = "contract-key"
LATENCY = 2.0
BASE_URL = "http://emulator.test"


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


make_emulator = partial(frozen_emulator, frozen_at=0.0, latency=LATENCY, api_key=KEY)


@pytest.fixture
def emulator() -> Emulator:
    return make_emulator()


@pytest.fixture
async def http(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@pytest.fixture
def sdk(http: httpx.AsyncClient) -> bem.AsyncBem:
    return bem.AsyncBem(api_key=KEY, base_url=BASE_URL, http_client=http, max_retries=0)


def models_in(value: object) -> Iterator[BaseModel]:
    if isinstance(value, BaseModel):
        yield value
        for name in type(value).model_fields:
            yield from models_in(getattr(value, name))
    elif isinstance(value, list):
        for element in value:
            yield from models_in(element)


def assert_no_unknown_fields(model: BaseModel) -> None:
    for nested in models_in(model):
        assert not nested.model_extra, f"{type(nested).__name__}: unknown {nested.model_extra}"


def strict_call(raw: dict[str, Any]) -> Call:
    call = Call.model_validate_json(json.dumps(raw), strict=True)
    assert_no_unknown_fields(call)
    for output in raw["outputs"]:
        event = TransformEvent.model_validate_json(json.dumps(output), strict=True)
        assert_no_unknown_fields(event)
    for error in raw["errors"]:
        assert_no_unknown_fields(ErrorEvent.model_validate_json(json.dumps(error), strict=True))
    return call


def strict_get_response(response: httpx.Response) -> CallGetResponse:
    parsed = CallGetResponse.model_validate_json(response.content, strict=True)
    assert_no_unknown_fields(parsed)
    strict_call(response.json()["call"])
    return parsed


# ---------------------------------------------------------------------------------------------
# the SDK as a client


async def test_sdk_invokes_retrieves_and_lists_with_filters(
    sdk: bem.AsyncBem, emulator: Emulator
) -> None:
    single = await sdk.workflows.call(
        "invoices",
        input={"single_file": {"input_content": b64(b"%PDF-1.7"), "input_type": "pdf"}},
        call_reference_id="sdk-1",
        metadata={"batch": 7},
    )
    batch = await sdk.workflows.call(
        "invoices",
        input={
            "batch_files": {
                "inputs": [
                    {"input_content": b64(b"png"), "input_type": "png", "item_reference_id": "p1"},
                    {
                        "input_content": b64(b"BEM-EMULATOR-FAIL"),
                        "input_type": "jpeg",
                        "item_reference_id": "p2",
                    },
                ]
            }
        },
        call_reference_id="sdk-2",
    )
    failed = await sdk.workflows.call(
        "invoices",
        input={"single_file": {"input_content": b64(b"BEM-EMULATOR-FAIL"), "input_type": "pdf"}},
        call_reference_id="sdk-3",
    )
    assert single.call is not None
    assert single.call.status == "pending"
    assert batch.call is not None
    assert failed.call is not None

    emulator.advance(LATENCY)
    retrieved = await sdk.calls.retrieve(batch.call.call_id)

    assert retrieved.call is not None
    assert retrieved.call.status == "completed"
    [output] = retrieved.call.outputs
    assert isinstance(output, TransformEvent)
    assert (output.reference_id, output.item_offset, output.item_count) == ("p1", 0, 2)
    [error] = retrieved.call.errors
    assert (error.reference_id, error.kind) == ("p2", "emulator_trigger")

    page = await sdk.calls.list(reference_ids=["sdk-1", "sdk-2", "sdk-3"], statuses=["completed"])
    assert [c.call_id for c in page.calls] == [single.call.call_id, batch.call.call_id]
    page = await sdk.calls.list(reference_ids=["sdk-3"], statuses=["failed", "completed"])
    assert [c.call_id for c in page.calls] == [failed.call.call_id]
    assert [c.call_reference_id for c in (await sdk.calls.list(reference_ids=["sdk-1"])).calls] == [
        "sdk-1"
    ]

    trace = await sdk.calls.retrieve_trace(batch.call.call_id)
    assert trace.trace is not None
    assert [f.status for f in trace.trace.function_calls] == ["completed", "failed"]


async def test_sdk_auto_pagination_walks_every_call(sdk: bem.AsyncBem) -> None:
    created = []
    for n in range(7):
        response = await sdk.workflows.call(
            "w",
            input={"single_file": {"input_content": b64(f"{n}".encode()), "input_type": "text"}},
        )
        assert response.call is not None
        created.append(response.call.call_id)
    assert [call.call_id async for call in sdk.calls.list(limit=3)] == created


async def test_sdk_wait_returns_the_finished_call() -> None:
    emulator = make_emulator(latency_min=0.0, latency_max=0.0)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=emulator.app), base_url=BASE_URL
    ) as http:
        sdk = bem.AsyncBem(api_key=KEY, base_url=BASE_URL, http_client=http, max_retries=0)
        done = await sdk.workflows.call(
            "w", input={"single_file": {"input_content": b64(b"x"), "input_type": "pdf"}}, wait=True
        )
        with pytest.raises(bem.InternalServerError) as failed:
            await sdk.workflows.call(
                "w",
                input={
                    "single_file": {"input_content": b64(b"BEM-EMULATOR-FAIL"), "input_type": "pdf"}
                },
                wait=True,
            )
    assert done.call is not None
    assert done.call.status == "completed"
    body = failed.value.body
    assert isinstance(body, dict)
    assert body["call"]["status"] == "failed"
    assert "BEM-EMULATOR-FAIL" in body["error"]


async def test_sdk_maps_the_emulators_errors(emulator: Emulator, http: httpx.AsyncClient) -> None:
    good = bem.AsyncBem(api_key=KEY, base_url=BASE_URL, http_client=http, max_retries=0)
    bad_key = bem.AsyncBem(api_key="nope", base_url=BASE_URL, http_client=http, max_retries=0)
    pdf: Any = {"single_file": {"input_content": b64(b"x"), "input_type": "pdf"}}
    with pytest.raises(bem.AuthenticationError):
        await bad_key.calls.list()
    with pytest.raises(bem.NotFoundError):
        await good.workflows.call("unknown-flow", input=pdf)
    with pytest.raises(bem.NotFoundError):
        await good.calls.retrieve("call_missing")
    exe: Any = {"single_file": {"input_content": b64(b"x"), "input_type": "exe"}}
    with pytest.raises(bem.BadRequestError, match="exe"):
        await good.workflows.call("w", input=exe)
    emulator.update(rate_limit_rps=1.0, rate_limit_burst=1)
    await good.calls.list()
    with pytest.raises(bem.RateLimitError):
        await good.calls.list()


# ---------------------------------------------------------------------------------------------
# raw JSON against the SDK's models, strictly


async def test_raw_responses_validate_strictly_in_every_state(
    http: httpx.AsyncClient, emulator: Emulator
) -> None:
    headers = {"x-api-key": KEY}

    def single(content: bytes, **extra: Any) -> dict[str, Any]:
        return {
            "input": {"singleFile": {"inputContent": b64(content), "inputType": "pdf"}},
            **extra,
        }

    batch = {
        "callReferenceID": "mixed",
        "metadata": {"source": "contract"},
        "input": {
            "batchFiles": {
                "inputs": [
                    {"inputContent": b64(b"ok"), "inputType": "text", "itemReferenceID": "a"},
                    {"inputContent": b64(b"BEM-EMULATOR-FAIL"), "inputType": "jpg"},
                ]
            }
        },
    }
    posted = [
        await http.post("/v3/workflows/w/call", json=single(b"plain"), headers=headers),
        await http.post("/v3/workflows/w/call", json=batch, headers=headers),
        await http.post(
            "/v3/workflows/w/call",
            json=single(b"BEM-EMULATOR-FAIL", callReferenceID="x"),
            headers=headers,
        ),
    ]
    function_call = await http.post(
        "/v2/calls", json={"calls": [{"functionName": "ocr", **single(b"f")}]}, headers=headers
    )
    call_ids = [r.json()["call"]["callID"] for r in posted] + [
        function_call.json()["calls"][0]["callID"]
    ]
    seen_statuses: set[str] = set()
    for response in posted:
        assert strict_get_response(response).call is not None

    for step in (0.0, LATENCY / 2, LATENCY):
        emulator.advance(step)
        for call_id in call_ids:
            got = strict_get_response(await http.get(f"/v3/calls/{call_id}", headers=headers))
            assert got.call is not None
            assert got.call.status is not None
            seen_statuses.add(got.call.status)
            trace = await http.get(f"/v3/calls/{call_id}/trace", headers=headers)
            parsed_trace = CallRetrieveTraceResponse.model_validate_json(trace.content, strict=True)
            assert_no_unknown_fields(parsed_trace)
            for event in trace.json()["trace"]["events"]:
                model = TransformEvent if event["eventType"] == "transform" else ErrorEvent
                assert_no_unknown_fields(model.model_validate_json(json.dumps(event), strict=True))
        listed = await http.get("/v3/calls", headers=headers)
        assert [strict_call(raw).call_id for raw in listed.json()["calls"]] == call_ids

    assert seen_statuses == {"pending", "running", "completed", "failed"}
    done = Call.model_validate_json(
        json.dumps((await http.get(f"/v3/calls/{call_ids[1]}", headers=headers)).json()["call"]),
        strict=True,
    )
    assert done.status == "completed"
    assert len(done.outputs) == 1
    assert len(done.errors) == 1
    assert done.finished_at is not None
    assert done.finished_at > done.created_at
    function = strict_call(
        (await http.get(f"/v3/calls/{call_ids[3]}", headers=headers)).json()["call"]
    )
    assert (function.call_type, function.function_name) == ("direct_function", "ocr")


def test_input_types_are_the_sdks() -> None:
    assert set(get_args(InputType)) == INPUT_TYPES
