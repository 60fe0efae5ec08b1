"""The emulator reads requests as strictly as bem's spec implies, so a client that speaks a
format bem does not (a repeated array key, ``PDF``, ``wait=1``, no Content-Type, a limit above
the maximum) fails here, not against bem."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.emulator import Emulator, EmulatorSettings
from runner.emulator.inputs import INPUT_TYPE_ALIASES, INPUT_TYPES
from runner.emulator.listing import ARRAY_PARAMS

pytestmark = pytest.mark.anyio

KEY = "strict-key"
AUTH = {"x-api-key": KEY}
INVOKE = "/v3/workflows/invoices/call"


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


def single(input_type: str = "pdf") -> dict[str, Any]:
    return {"input": {"singleFile": {"inputContent": b64(b"%PDF-1.7"), "inputType": input_type}}}


def batch_of(references: list[str]) -> dict[str, Any]:
    inputs = [
        {"itemReferenceID": reference, "inputContent": b64(b"x"), "inputType": "text"}
        for reference in references
    ]
    return {"input": {"batchFiles": {"inputs": inputs}}}


@pytest.fixture
def emulator() -> Emulator:
    return Emulator(EmulatorSettings(api_key=KEY, latency_min=1.0, latency_max=1.0))


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://strict.test") as client:
        yield client


# -- list filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(ARRAY_PARAMS))
async def test_a_repeated_array_key_is_400_and_one_comma_joined_key_is_not(
    client: httpx.AsyncClient, key: str
) -> None:
    values = {"statuses": ["pending", "failed"], "callTypes": ["workflow", "direct_function"]}
    pair = values.get(key, ["a", "b"])

    repeated = await client.get("/v3/calls", params=[(key, pair[0]), (key, pair[1])], headers=AUTH)
    joined = await client.get("/v3/calls", params={key: ",".join(pair)}, headers=AUTH)

    assert repeated.status_code == 400
    assert f"{key}: given more than once" in repeated.json()["error"]
    assert "comma-separated" in repeated.json()["error"]
    assert joined.status_code == 200, joined.text


@pytest.mark.parametrize("key", ["limit", "sortOrder", "startingAfter", "referenceIDSubstring"])
async def test_a_repeated_scalar_key_is_400(client: httpx.AsyncClient, key: str) -> None:
    response = await client.get("/v3/calls", params=[(key, "1"), (key, "2")], headers=AUTH)
    assert response.status_code == 400


@given(limit=st.integers(min_value=-(10**6), max_value=10**6))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_limit_outside_1_to_100_is_refused_never_cut(
    client: httpx.AsyncClient, limit: int
) -> None:
    response = await client.get("/v3/calls", params={"limit": str(limit)}, headers=AUTH)
    assert response.status_code == (200 if 1 <= limit <= 100 else 400)


# -- inputType -------------------------------------------------------------------------------------


@given(
    input_type=st.sampled_from(sorted(INPUT_TYPES | set(INPUT_TYPE_ALIASES))),
    flips=st.lists(st.booleans(), min_size=1, max_size=5),
)
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_input_type_in_any_case_but_lower_is_refused(
    client: httpx.AsyncClient, input_type: str, flips: list[bool]
) -> None:
    mixed = "".join(
        char.upper() if flips[index % len(flips)] else char for index, char in enumerate(input_type)
    )
    response = await client.post(INVOKE, json=single(mixed), headers=AUTH)
    assert response.status_code == (202 if mixed == input_type else 400), response.text


async def test_a_form_input_type_must_be_lower_case(client: httpx.AsyncClient) -> None:
    files = {"file": ("a.pdf", b"%PDF", "application/pdf")}
    upper = await client.post(INVOKE, data={"inputType": "PDF"}, files=files, headers=AUTH)
    lower = await client.post(INVOKE, data={"inputType": "pdf"}, files=files, headers=AUTH)
    assert (upper.status_code, lower.status_code) == (400, 202)


# -- wait ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "0", "", "TRUE", "False", "yes", " true", "true "])
async def test_wait_is_only_true_or_false(client: httpx.AsyncClient, value: str) -> None:
    query = await client.post(INVOKE, params={"wait": value}, json=single(), headers=AUTH)
    form = await client.post(
        INVOKE,
        data={"wait": value, "inputType": "pdf"},
        files={"file": ("a.pdf", b"%PDF", "application/pdf")},
        headers=AUTH,
    )
    assert (query.status_code, form.status_code) == (400, 400)
    assert "not a boolean" in query.json()["error"]


async def test_wait_false_is_accepted_and_a_repeated_wait_is_not(
    client: httpx.AsyncClient,
) -> None:
    once = await client.post(INVOKE, params={"wait": "false"}, json=single(), headers=AUTH)
    twice = await client.post(
        INVOKE, params=[("wait", "false"), ("wait", "false")], json=single(), headers=AUTH
    )
    assert (once.status_code, twice.status_code) == (202, 400)


# -- Content-Type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [INVOKE, "/v2/calls"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_needs_its_content_type(
    client: httpx.AsyncClient, emulator: Emulator, path: str, content_type: str | None
) -> None:
    body = single() if path == INVOKE else {"calls": [{"workflowName": "w", **single()}]}
    headers = AUTH | ({} if content_type is None else {"content-type": content_type})

    response = await client.post(path, content=json.dumps(body).encode(), headers=headers)

    assert response.status_code == 400
    assert "Content-Type" in response.json()["error"]
    assert emulator.stats()["calls_total"] == 0


async def test_a_content_type_with_parameters_is_fine(client: httpx.AsyncClient) -> None:
    headers = AUTH | {"content-type": "application/json; charset=utf-8"}
    response = await client.post(INVOKE, content=json.dumps(single()).encode(), headers=headers)
    assert response.status_code == 202


# -- itemReferenceID -------------------------------------------------------------------------------


@given(references=st.lists(st.text(max_size=40), min_size=1, max_size=4, unique=True))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_outputs_carry_exactly_the_item_references_sent(
    client: httpx.AsyncClient, emulator: Emulator, references: list[str]
) -> None:
    created = await client.post(INVOKE, json=batch_of(references), headers=AUTH)
    assert created.status_code == 202, created.text
    call_id = created.json()["call"]["callID"]
    emulator.advance(1.0)

    call = (await client.get(f"/v3/calls/{call_id}", headers=AUTH)).json()["call"]

    assert [event["referenceID"] for event in call["outputs"]] == references
    assert [item["itemReferenceID"] for item in call["input"]["batchFiles"]["inputs"]] == references
