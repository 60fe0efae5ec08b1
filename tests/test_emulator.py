"""The emulator's API behaviour, in process through httpx.ASGITransport, on a frozen clock."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import httpx
import pytest

from runner.api.models import CallList, CallResponse, V2CallResponse, V2CreateResponse
from runner.emulator import Emulator, EmulatorSettings
from runner.emulator.settings import parse_settings
from runner.errors import ConfigError

from .conftest import frozen_emulator

pytestmark = pytest.mark.anyio

KEY = "test-key"
AUTH = {"x-api-key": KEY}
LATENCY = 3.0


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


def single(
    content: bytes = b"%PDF-1.7 invoice", input_type: str = "pdf", **extra: Any
) -> dict[str, Any]:
    return {
        "input": {"singleFile": {"inputContent": b64(content), "inputType": input_type}},
        **extra,
    }


def batch(*items: tuple[str, bytes, str], **extra: Any) -> dict[str, Any]:
    inputs = [
        {"itemReferenceID": ref, "inputContent": b64(content), "inputType": input_type}
        for ref, content, input_type in items
    ]
    return {"input": {"batchFiles": {"inputs": inputs}}, **extra}


make_emulator = partial(frozen_emulator, frozen_at=1000.0, latency=LATENCY, api_key=KEY)


@pytest.fixture
def emulator() -> Emulator:
    return make_emulator()


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator.test") as client:
        yield client


async def invoke(
    client: httpx.AsyncClient, body: dict[str, Any], workflow: str = "invoices"
) -> dict[str, Any]:
    response = await client.post(f"/v3/workflows/{workflow}/call", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    call: dict[str, Any] = response.json()["call"]
    return call


async def get_call(client: httpx.AsyncClient, call_id: str) -> dict[str, Any]:
    response = await client.get(f"/v3/calls/{call_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    call: dict[str, Any] = response.json()["call"]
    return call


# ---------------------------------------------------------------------------------------------
# call lifecycle and outputs


async def test_call_moves_pending_running_completed_with_emulator_time(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(client, single(callReferenceID="ref-1"))
    assert created["status"] == "pending"
    assert created["outputs"] == []
    assert created["errors"] == []
    assert "finishedAt" not in created

    emulator.advance(LATENCY / 3)
    assert (await get_call(client, created["callID"]))["status"] == "running"
    emulator.advance(LATENCY * 2 / 3)
    done = await get_call(client, created["callID"])

    assert done["status"] == "completed"
    assert done["createdAt"] == created["createdAt"]
    assert done["createdAt"].endswith("Z")
    parsed = CallResponse.from_json(json.dumps({"call": done}).encode()).call
    assert parsed is not None
    created_at = parsed.created_at
    assert created_at is not None
    assert done["finishedAt"].endswith("Z")
    [output] = done["outputs"]
    assert output["eventType"] == "transform"
    assert output["referenceID"] == "ref-1"
    assert (output["itemOffset"], output["itemCount"]) == (0, 1)
    assert output["callID"] == created["callID"]
    assert output["transformedContent"] == {
        "referenceID": "ref-1",
        "inputType": "pdf",
        "byteSize": len(b"%PDF-1.7 invoice"),
        "sha256": hashlib.sha256(b"%PDF-1.7 invoice").hexdigest(),
    }
    assert done["errors"] == []
    assert done["input"] == {"singleFile": {"inputType": "pdf"}}
    assert done["url"] == f"http://emulator.test/v3/calls/{created['callID']}"


async def test_finished_at_is_created_at_plus_latency(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(client, single())
    emulator.advance(LATENCY)
    done = await get_call(client, created["callID"])
    call = CallResponse.from_json(json.dumps({"call": done}).encode()).call
    assert call is not None
    assert call.created_at is not None
    assert call.finished_at is not None
    elapsed = datetime.fromisoformat(call.finished_at) - datetime.fromisoformat(call.created_at)
    assert elapsed.total_seconds() == pytest.approx(LATENCY, abs=0.002)


async def test_single_file_without_reference_uses_reference_0(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(client, single(b"plain words for the excerpt here", "text"))
    emulator.advance(LATENCY)
    [output] = (await get_call(client, created["callID"]))["outputs"]
    assert output["referenceID"] == "0"
    assert output["transformedContent"]["excerpt"] == "plain words for the excerpt here"


async def test_batch_items_carry_their_reference_offset_and_count(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(
        client,
        batch(
            ("a/1.pdf", b"one", "pdf"), ("a/2.png", b"two", "png"), ("a/3.csv", b"x,y\n1,2", "csv")
        ),
    )
    emulator.advance(LATENCY)
    call = await get_call(client, created["callID"])
    assert [(o["referenceID"], o["itemOffset"], o["itemCount"]) for o in call["outputs"]] == [
        ("a/1.pdf", 0, 3),
        ("a/2.png", 1, 3),
        ("a/3.csv", 2, 3),
    ]
    assert call["input"]["batchFiles"]["inputs"][1] == {
        "inputType": "png",
        "itemReferenceID": "a/2.png",
    }
    assert call["outputs"][2]["transformedContent"]["excerpt"] == "x,y 1,2"


async def test_batch_item_without_reference_is_named_by_its_offset(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    body = {"input": {"batchFiles": {"inputs": [{"inputContent": b64(b"a"), "inputType": "pdf"}]}}}
    created = await invoke(client, body)
    emulator.advance(LATENCY)
    assert (await get_call(client, created["callID"]))["outputs"][0]["referenceID"] == "0"


async def test_jpg_and_jfif_are_normalized_to_jpeg(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(
        client, batch(("a", b"1", "jpg"), ("b", b"2", "jfif"), ("c", b"3", "jpeg"))
    )
    types = [i["inputType"] for i in created["input"]["batchFiles"]["inputs"]]
    assert types == ["jpeg", "jpeg", "jpeg"]


async def test_metadata_is_injected_into_transformed_content(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(client, single(metadata={"customer": 42}, bucket="b1"))
    emulator.advance(LATENCY)
    [output] = (await get_call(client, created["callID"]))["outputs"]
    assert output["transformedContent"]["_metadata"] == {"customer": 42}


async def test_fail_trigger_makes_partial_batch_completed_with_outputs_and_errors(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(
        client, batch(("good", b"fine", "pdf"), ("bad", b"xx BEM-EMULATOR-FAIL xx", "pdf"))
    )
    emulator.advance(LATENCY)
    call = await get_call(client, created["callID"])
    assert call["status"] == "completed"
    assert [o["referenceID"] for o in call["outputs"]] == ["good"]
    [error] = call["errors"]
    assert error["eventType"] == "error"
    assert error["referenceID"] == "bad"
    assert error["kind"] == "emulator_trigger"
    assert "BEM-EMULATOR-FAIL" in error["message"]


async def test_call_whose_items_all_fail_is_failed(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(client, single(b"BEM-EMULATOR-FAIL", callReferenceID="r"))
    emulator.advance(LATENCY)
    call = await get_call(client, created["callID"])
    assert call["status"] == "failed"
    assert call["outputs"] == []
    assert [e["referenceID"] for e in call["errors"]] == ["r"]


async def test_failure_rate_is_per_item_and_seeded() -> None:
    async def failed_refs(seed: int) -> list[str]:
        emulator = make_emulator(failure_rate=0.5, seed=seed)
        transport = httpx.ASGITransport(app=emulator.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            items = [(f"item-{n}", f"content {n}".encode(), "pdf") for n in range(20)]
            created = await invoke(client, batch(*items))
            emulator.advance(LATENCY)
            call = await get_call(client, created["callID"])
        assert {e["kind"] for e in call["errors"]} <= {"emulator_random_failure"}
        return [e["referenceID"] for e in call["errors"]]

    first, again, other_seed = await failed_refs(7), await failed_refs(7), await failed_refs(8)
    assert first == again
    assert 0 < len(first) < 20
    assert first != other_seed


async def test_call_ids_never_repeat_across_restarts_with_the_same_seed() -> None:
    async def run(seed: int, instance: str | None = None) -> list[dict[str, Any]]:
        emulator = Emulator(
            EmulatorSettings(api_key=KEY, latency_min=0.5, latency_max=9.0, seed=seed),
            clock=lambda: 1000.0,
            instance=instance,
        )
        transport = httpx.ASGITransport(app=emulator.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            return [await invoke(client, single()) for _ in range(3)]

    restarts = [await run(1) for _ in range(5)]
    ids = [call["callID"] for calls in restarts for call in calls]
    assert len(set(ids)) == len(ids) == 15
    # Everything but the instance part stays determined by the seed.
    pinned = [await run(1, instance="0a"), await run(1, instance="0a"), await run(2, instance="0a")]
    assert [c["callID"] for c in pinned[0]] == [c["callID"] for c in pinned[1]]
    assert [c["callID"] for c in pinned[0]] != [c["callID"] for c in pinned[2]]


async def test_trace_grows_with_the_call(client: httpx.AsyncClient, emulator: Emulator) -> None:
    created = await invoke(client, batch(("a", b"1", "pdf"), ("b", b"BEM-EMULATOR-FAIL", "pdf")))
    url = f"/v3/calls/{created['callID']}/trace"
    assert (await client.get(url, headers=AUTH)).json() == {
        "trace": {"functionCalls": [], "events": []}
    }
    emulator.advance(LATENCY / 2)
    running = (await client.get(url, headers=AUTH)).json()["trace"]
    assert [f["status"] for f in running["functionCalls"]] == ["running", "running"]
    assert running["events"] == []
    emulator.advance(LATENCY)
    done = (await client.get(url, headers=AUTH)).json()["trace"]
    assert [f["status"] for f in done["functionCalls"]] == ["completed", "failed"]
    assert [e["eventType"] for e in done["events"]] == ["transform", "error"]


async def test_unknown_call_is_404(client: httpx.AsyncClient) -> None:
    for path in ("/v3/calls/nope", "/v3/calls/nope/trace", "/v2/calls/nope"):
        response = await client.get(path, headers=AUTH)
        assert response.status_code == 404
        assert "nope" in response.json()["error"]


async def test_unknown_route_is_a_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v3/nothing-here", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


# ---------------------------------------------------------------------------------------------
# auth, validation, workflows

API_REQUESTS = [
    ("POST", "/v3/workflows/invoices/call"),
    ("GET", "/v3/calls"),
    ("GET", "/v3/calls/any"),
    ("GET", "/v3/calls/any/trace"),
    ("POST", "/v2/calls"),
    ("GET", "/v2/calls/any"),
]


@pytest.mark.parametrize(("method", "path"), API_REQUESTS)
@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}], ids=["missing", "wrong"])
async def test_every_api_route_requires_the_api_key(
    client: httpx.AsyncClient, emulator: Emulator, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await client.request(method, path, headers=headers, json=single())
    assert response.status_code == 401
    assert "x-api-key" in response.json()["error"]
    assert emulator.stats()["calls_total"] == 0
    [(route, statuses)] = emulator.stats()["requests"].items()
    assert route.startswith(f"{method} /v")
    assert statuses == {"401": 1}


async def test_control_routes_need_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/_emulator/stats")).status_code == 200
    assert (await client.get("/_emulator/settings")).status_code == 200


INVALID_BODIES: list[tuple[str, object, str]] = [
    ("not json", b"{nope", "not valid JSON"),
    ("not an object", [], "must be a JSON object"),
    ("no input", {}, "input: required"),
    ("both modes", {"input": {"singleFile": {}, "batchFiles": {}}}, "exactly one of singleFile"),
    ("neither mode", {"input": {}}, "exactly one of singleFile"),
    (
        "bad base64",
        {"input": {"singleFile": {"inputContent": "***", "inputType": "pdf"}}},
        "singleFile.inputContent: not valid base64",
    ),
    (
        "bad type",
        {"input": {"singleFile": {"inputContent": b64(b"x"), "inputType": "exe"}}},
        "'exe' is not a supported input type",
    ),
    (
        "missing type",
        {"input": {"singleFile": {"inputContent": b64(b"x")}}},
        "singleFile.inputType: required",
    ),
    (
        "missing content",
        {"input": {"singleFile": {"inputType": "pdf"}}},
        "singleFile.inputContent: required",
    ),
    ("empty file", single(b""), "the file is empty"),
    ("empty batch", {"input": {"batchFiles": {"inputs": []}}}, "must be a non-empty array"),
    (
        "bad batch item",
        batch(("a", b"1", "pdf"), ("b", b"2", "nope")),
        "batchFiles.inputs[1].inputType",
    ),
    ("invalid trigger", batch(("a", b"BEM-EMULATOR-INVALID", "pdf")), "BEM-EMULATOR-INVALID"),
    ("metadata not object", single(metadata=[1]), "metadata: must be a JSON object"),
    ("metadata too large", single(metadata={"x": "y" * 5000}), "more than the 4096 allowed"),
    ("reference not string", single(callReferenceID=5), "callReferenceID: must be a string"),
    ("unknown field", single(wait=True), "unknown field(s) wait"),
]


@pytest.mark.parametrize(
    ("body", "message"),
    [(body, message) for _, body, message in INVALID_BODIES],
    ids=[name for name, _, _ in INVALID_BODIES],
)
async def test_invalid_bodies_are_400_with_a_clear_message_and_create_nothing(
    client: httpx.AsyncClient, emulator: Emulator, body: object, message: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(
        "/v3/workflows/invoices/call",
        content=content,
        headers=AUTH | {"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert emulator.stats()["calls_total"] == 0


async def test_unsupported_content_type_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v3/workflows/w/call", content=b"x", headers=AUTH | {"content-type": "text/plain"}
    )
    assert response.status_code == 400
    assert "text/plain" in response.json()["error"]


async def test_unknown_workflow_is_404(client: httpx.AsyncClient, emulator: Emulator) -> None:
    response = await client.post("/v3/workflows/unknown-flow/call", json=single(), headers=AUTH)
    assert response.status_code == 404
    assert "unknown-flow" in response.json()["error"]
    assert emulator.stats()["calls_total"] == 0


async def test_configured_workflows_are_the_only_ones() -> None:
    emulator = make_emulator(workflows=["invoices"])
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
        await invoke(client, single(), workflow="invoices")
        response = await client.post("/v3/workflows/receipts/call", json=single(), headers=AUTH)
    assert response.status_code == 404


# ---------------------------------------------------------------------------------------------
# wait=true


async def call_and_wait(
    client: httpx.AsyncClient, emulator: Emulator, body: dict[str, Any], advance: float
) -> httpx.Response:
    responses: list[httpx.Response] = []

    async def post() -> None:
        responses.append(
            await client.post(
                "/v3/workflows/w/call", params={"wait": "true"}, json=body, headers=AUTH
            )
        )

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(post)
        await emulator.wait_blocked()
        assert responses == []
        emulator.advance(advance)
    return responses[0]


async def test_wait_true_answers_200_when_the_call_completes(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    response = await call_and_wait(client, emulator, single(), LATENCY)
    assert response.status_code == 200
    assert response.json()["call"]["status"] == "completed"
    assert len(response.json()["call"]["outputs"]) == 1


async def test_wait_true_answers_500_with_the_call_and_an_error_when_it_fails(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    response = await call_and_wait(client, emulator, single(b"BEM-EMULATOR-FAIL"), LATENCY)
    assert response.status_code == 500
    body = response.json()
    assert body["call"]["status"] == "failed"
    assert "BEM-EMULATOR-FAIL" in body["error"]


async def test_wait_true_answers_202_when_the_wait_times_out() -> None:
    emulator = make_emulator(wait_timeout=1.0)
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
        response = await call_and_wait(client, emulator, single(), 1.0)
    assert response.status_code == 202
    assert response.json()["call"]["status"] == "running"


async def test_wait_false_and_bad_wait_values(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v3/workflows/w/call", params={"wait": "false"}, json=single(), headers=AUTH
    )
    assert response.status_code == 202
    response = await client.post(
        "/v3/workflows/w/call", params={"wait": "maybe"}, json=single(), headers=AUTH
    )
    assert response.status_code == 400
    assert "wait" in response.json()["error"]


# ---------------------------------------------------------------------------------------------
# multipart


async def test_multipart_single_file_takes_its_type_from_the_extension(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    response = await client.post(
        "/v3/workflows/w/call",
        files={"file": ("scan.JPG", b"jpeg bytes")},
        data={"callReferenceID": "mp-1", "metadata": json.dumps({"k": "v"})},
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    call = response.json()["call"]
    assert call["input"] == {"singleFile": {"inputType": "jpeg"}}
    emulator.advance(LATENCY)
    [output] = (await get_call(client, call["callID"]))["outputs"]
    assert output["referenceID"] == "mp-1"
    assert output["transformedContent"]["sha256"] == hashlib.sha256(b"jpeg bytes").hexdigest()
    assert output["transformedContent"]["_metadata"] == {"k": "v"}


async def test_multipart_files_become_a_batch_named_by_filename(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    big = b"0123456789abcdef" * 200_000  # 3.2 MB: spooled to disk by the form parser
    response = await client.post(
        "/v3/workflows/w/call",
        files=[("files", ("big.bin", big)), ("files", ("small.bin", b"BEM-EMULATOR-FAIL"))],
        data={"inputType": "pdf"},
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    emulator.advance(LATENCY)
    call = await get_call(client, response.json()["call"]["callID"])
    [output] = call["outputs"]
    assert output["referenceID"] == "big.bin"
    assert output["transformedContent"]["byteSize"] == len(big)
    assert output["transformedContent"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert [e["referenceID"] for e in call["errors"]] == ["small.bin"]


async def test_multipart_wait_field(client: httpx.AsyncClient, emulator: Emulator) -> None:
    responses: list[httpx.Response] = []

    async def post() -> None:
        responses.append(
            await client.post(
                "/v3/workflows/w/call",
                files={"file": ("a.txt", b"hello")},
                data={"wait": "true"},
                headers=AUTH,
            )
        )

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(post)
        await emulator.wait_blocked()
        emulator.advance(LATENCY)
    assert responses[0].status_code == 200


@pytest.mark.parametrize(
    ("files", "data", "message"),
    [
        ([("file", ("a.pdf", b"1")), ("files", ("b.pdf", b"2"))], {}, "exactly one 'file'"),
        ([("callReferenceID", (None, b"x"))], {}, "exactly one 'file'"),
        ([("file", (None, b"text"))], {}, "must be a file upload"),
        ([("file", ("a.exe", b"1"))], {}, "cannot tell the input type"),
        ([("file", ("a", b"1"))], {"inputType": "exe"}, "'exe' is not a supported"),
        ([("file", ("a.pdf", b"1"))], {"metadata": "{bad"}, "metadata: not valid JSON"),
        ([("file", ("a.pdf", b"1"))], {"color": "red"}, "unknown field(s) color"),
        ([("file", ("a.pdf", b"BEM-EMULATOR-INVALID"))], {}, "BEM-EMULATOR-INVALID"),
    ],
)
async def test_multipart_validation(
    client: httpx.AsyncClient,
    emulator: Emulator,
    files: list[tuple[str, tuple[str | None, bytes]]],
    data: dict[str, str],
    message: str,
) -> None:
    response = await client.post("/v3/workflows/w/call", files=files, data=data, headers=AUTH)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert emulator.stats()["calls_total"] == 0


# ---------------------------------------------------------------------------------------------
# listing


async def list_calls(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v3/calls", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    CallList.from_json(response.content)
    calls: list[dict[str, Any]] = response.json()["calls"]
    return calls


async def create_many(client: httpx.AsyncClient, count: int) -> list[str]:
    return [
        (await invoke(client, single(f"file {n}".encode(), callReferenceID=f"Ref-{n}")))["callID"]
        for n in range(count)
    ]


async def test_pagination_forward_with_starting_after(client: httpx.AsyncClient) -> None:
    ids = await create_many(client, 5)
    pages: list[list[str]] = []
    cursor: dict[str, str] = {}
    while page := [c["callID"] for c in await list_calls(client, limit=2, **cursor)]:
        pages.append(page)
        cursor = {"startingAfter": page[-1]}
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]


async def test_pagination_backward_with_ending_before(client: httpx.AsyncClient) -> None:
    ids = await create_many(client, 5)
    page = [c["callID"] for c in await list_calls(client, limit=2, endingBefore=ids[4])]
    assert page == ids[2:4]
    page = [c["callID"] for c in await list_calls(client, limit=2, endingBefore=page[0])]
    assert page == ids[0:2]
    assert await list_calls(client, limit=2, endingBefore=ids[0]) == []


async def test_pagination_descending_and_with_both_cursors(client: httpx.AsyncClient) -> None:
    ids = await create_many(client, 5)
    newest_first = [c["callID"] for c in await list_calls(client, sortOrder="desc")]
    assert newest_first == ids[::-1]
    after = [c["callID"] for c in await list_calls(client, sortOrder="desc", startingAfter=ids[3])]
    assert after == [ids[2], ids[1], ids[0]]
    between = await list_calls(client, startingAfter=ids[0], endingBefore=ids[4])
    assert [c["callID"] for c in between] == ids[1:4]
    before_desc = await list_calls(client, sortOrder="desc", endingBefore=ids[1], limit=2)
    assert [c["callID"] for c in before_desc] == [ids[3], ids[2]]


async def test_limit_defaults_to_50_and_above_100_is_refused(client: httpx.AsyncClient) -> None:
    await create_many(client, 101)
    assert len(await list_calls(client)) == 50
    assert len(await list_calls(client, limit=100)) == 100
    for too_many in ("101", "500", "99999999999999999999"):
        response = await client.get("/v3/calls", params={"limit": too_many}, headers=AUTH)
        assert response.status_code == 400
        assert "from 1 to 100" in response.json()["error"]


async def test_list_filters(client: httpx.AsyncClient, emulator: Emulator) -> None:
    first = await invoke(client, single(callReferenceID="Invoice-A"), workflow="invoices")
    emulator.advance(LATENCY)
    second = await invoke(client, single(callReferenceID="invoice-b"), workflow="receipts")
    third = await invoke(client, single(callReferenceID="other"), workflow="receipts")
    response = await client.post(
        "/v2/calls",
        json={"calls": [{"functionName": "ocr", "callReferenceID": "fn-1", **single()}]},
        headers=AUTH,
    )
    function_call = response.json()["calls"][0]

    async def ids(**params: Any) -> list[str]:
        return [c["callID"] for c in await list_calls(client, **params)]

    a, b, c, f = first["callID"], second["callID"], third["callID"], function_call["callID"]
    assert await ids(callIDs=f"{a},{c}") == [a, c]
    assert await ids(callIDs=a) == [a]
    assert await ids(referenceIDs="invoice-b,other") == [b, c]
    assert await ids(referenceIDs="Invoice-A,fn-1") == [a, f]
    assert await ids(referenceIDSubstring="INVOICE") == [a, b]
    assert await ids(workflowNames="receipts") == [b, c]
    assert await ids(workflowIDs=first["workflowID"]) == [a]
    assert await ids(statuses="completed") == [a]
    assert await ids(statuses="pending,completed") == [a, b, c, f]
    assert await ids(callTypes="direct_function") == [f]
    assert await ids(callTypes="workflow") == [a, b, c]
    assert await ids(functionNames="ocr") == [f]
    assert await ids(functionIDs=function_call["functionID"]) == [f]
    assert await ids(workflowNames="receipts", referenceIDSubstring="b") == [b]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"statuses": "done"}, "statuses: done"),
        ({"callTypes": "batch"}, "callTypes: batch"),
        ({"sortOrder": "up"}, "sortOrder"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "+5"}, "limit"),
        ({"limit": " 5"}, "limit"),
        ({"limit": "5_0"}, "limit"),
        ({"limit": "٥"}, "limit"),
        ({"startingAfter": "call_nope"}, "startingAfter: no call"),
        ({"endingBefore": "call_nope"}, "endingBefore: no call"),
        ({"reference_ids": "x"}, "unknown query parameter(s): reference_ids"),
    ],
)
async def test_bad_list_parameters_are_400(
    client: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    response = await client.get("/v3/calls", params=params, headers=AUTH)
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_visibility_lag_hides_new_calls_from_the_listing_only() -> None:
    emulator = make_emulator(list_visibility_lag=5.0)
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
        created = await invoke(client, single(callReferenceID="lagging"))
        assert await list_calls(client, referenceIDs="lagging") == []
        assert (await get_call(client, created["callID"]))["callID"] == created["callID"]
        emulator.advance(4.9)
        assert await list_calls(client, referenceIDs="lagging") == []
        emulator.advance(0.1)
        assert [c["callID"] for c in await list_calls(client, referenceIDs="lagging")] == [
            created["callID"]
        ]
        emulator.update(list_visibility_lag=60.0)
        assert await list_calls(client, referenceIDs="lagging") == []


# ---------------------------------------------------------------------------------------------
# v2

# Field names of the v2 call documents (seeds: v2-create-calls, v2-get-call).
SEED_V2_CALL_FIELDS = {
    "callID", "callType", "status", "createdAt", "finishedAt", "workflowID", "workflowName",
    "workflowVersionNum", "functionID", "functionName", "functionType", "functionVersionNum",
    "callReferenceID", "functionCalls", "input",
}  # fmt: skip
SEED_V2_FUNCTION_CALL_FIELDS = {
    "functionCallID", "functionID", "functionName", "type", "referenceID", "status",
    "functionVersionNum", "activity", "sourceFunctionCallID", "workflowCallID", "inputType",
    "s3URL", "inputs",
}  # fmt: skip
SEED_STATUSES = {"pending", "running", "completed", "failed"}


def assert_seed_v2_shape(call: dict[str, Any]) -> None:
    assert set(call) <= SEED_V2_CALL_FIELDS
    assert {"callID", "callType", "status", "createdAt", "functionCalls", "input"} <= set(call)
    assert call["status"] in SEED_STATUSES
    for function_call in call["functionCalls"]:
        assert set(function_call) <= SEED_V2_FUNCTION_CALL_FIELDS
        assert function_call["status"] in SEED_STATUSES
        assert set(function_call["activity"][0]) == {"displayName", "status"}
        assert all(
            set(i) <= {"inputType", "itemReferenceID", "s3URL"} for i in function_call["inputs"]
        )
    files = call["input"].get("singleFile") or call["input"]["batchFiles"]["inputs"][0]
    assert set(files) <= {"inputType", "itemReferenceID", "s3URL"}


async def test_v2_create_returns_calls_in_request_order_in_the_seed_shape(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    body = {
        "calls": [
            {"workflowName": "invoices", "callReferenceID": "v2-a", **single()},
            {
                "workflowName": "receipts",
                "callReferenceID": "v2-b",
                **batch(("x", b"1", "png"), ("y", b"2", "png")),
            },
        ]
    }
    response = await client.post("/v2/calls", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    calls = V2CreateResponse.from_json(response.content).calls
    assert [(c.workflow_name, c.call_reference_id, c.status) for c in calls] == [
        ("invoices", "v2-a", "pending"),
        ("receipts", "v2-b", "pending"),
    ]
    for call in response.json()["calls"]:
        assert_seed_v2_shape(call)
    assert [f["referenceID"] for f in response.json()["calls"][1]["functionCalls"]] == ["x", "y"]


async def test_v2_get_follows_the_call_to_its_end(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    body = {
        "calls": [
            {
                "workflowName": "w",
                **batch(("ok", b"1", "pdf"), ("bad", b"BEM-EMULATOR-FAIL", "pdf")),
            }
        ]
    }
    call_id = (await client.post("/v2/calls", json=body, headers=AUTH)).json()["calls"][0]["callID"]
    emulator.advance(LATENCY / 2)
    running = (await client.get(f"/v2/calls/{call_id}", headers=AUTH)).json()["call"]
    assert running["status"] == "running"
    assert "finishedAt" not in running
    emulator.advance(LATENCY)
    response = await client.get(f"/v2/calls/{call_id}", headers=AUTH)
    done = V2CallResponse.from_json(response.content).call
    assert done is not None
    assert_seed_v2_shape(response.json()["call"])
    assert done.status == "completed"
    assert done.finished_at is not None
    assert [(f.reference_id, f.status) for f in done.function_calls] == [
        ("ok", "completed"),
        ("bad", "failed"),
    ]
    assert [a.status for f in done.function_calls for a in f.activity] == ["completed", "failed"]
    # The same call through v3 carries the results.
    v3 = await get_call(client, call_id)
    assert [o["referenceID"] for o in v3["outputs"]] == ["ok"]


async def test_v2_targets(client: httpx.AsyncClient, emulator: Emulator) -> None:
    known = await invoke(client, single(), workflow="invoices")
    body = {
        "calls": [
            {"workflowID": known["workflowID"], **single()},
            {"functionName": "ocr", **single()},
            {"functionID": "fn_custom", **single()},
        ]
    }
    calls = (await client.post("/v2/calls", json=body, headers=AUTH)).json()["calls"]
    assert calls[0]["workflowName"] == "invoices"
    assert (calls[1]["callType"], calls[1]["functionName"]) == ("direct_function", "ocr")
    assert calls[2]["functionID"] == "fn_custom"
    for call in calls:
        assert_seed_v2_shape(call)


@pytest.mark.parametrize(
    ("entry", "status", "message"),
    [
        (
            {"workflowName": "unknown-x", **single()},
            404,
            "calls[1].workflowName: 'unknown-x' not found",
        ),
        ({"workflowID": "wf_nope", **single()}, 404, "calls[1].workflowID"),
        (
            {"workflowName": "a", "functionName": "b", **single()},
            400,
            "calls[1]: provide exactly one",
        ),
        ({**single()}, 400, "calls[1]: provide exactly one"),
        ({"workflowName": "w", "input": {}}, 400, "calls[1].input: provide exactly one"),
        ({"workflowName": "w", "colour": 1, **single()}, 400, "calls[1]: unknown field(s) colour"),
    ],
)
async def test_v2_invalid_entry_rejects_the_whole_request(
    client: httpx.AsyncClient, emulator: Emulator, entry: dict[str, Any], status: int, message: str
) -> None:
    body = {"calls": [{"workflowName": "fine", **single()}, entry]}
    response = await client.post("/v2/calls", json=body, headers=AUTH)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert emulator.stats()["calls_total"] == 0


async def test_v2_body_must_hold_calls(client: httpx.AsyncClient) -> None:
    bodies: list[dict[str, Any]] = [{}, {"calls": []}, {"calls": "x"}]
    for body in bodies:
        response = await client.post("/v2/calls", json=body, headers=AUTH)
        assert response.status_code == 400
        assert "calls" in response.json()["error"]


# ---------------------------------------------------------------------------------------------
# stats and control routes


async def test_stats_count_requests_calls_references_and_files(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    await invoke(client, single(b"same bytes", callReferenceID="r1"))
    await invoke(client, single(b"same bytes", callReferenceID="r1"))
    await invoke(client, batch(("a", b"other", "pdf")))
    await client.get("/v3/calls/missing", headers=AUTH)
    await client.get("/v3/calls", headers=AUTH)

    stats = (await client.get("/_emulator/stats")).json()

    assert stats == emulator.stats()
    assert stats["requests"] == {
        "POST /v3/workflows/{workflowName}/call": {"202": 3},
        "GET /v3/calls/{callID}": {"404": 1},
        "GET /v3/calls": {"200": 1},
    }
    assert stats["calls_total"] == 3
    assert stats["calls_by_reference"] == {"r1": 2}
    assert stats["files_by_content_sha256"] == {
        hashlib.sha256(b"same bytes").hexdigest(): 2,
        hashlib.sha256(b"other").hexdigest(): 1,
    }
    assert stats["calls_by_status"] == {"pending": 3, "running": 0, "completed": 0, "failed": 0}
    assert stats["rate_limited"] == 0


async def test_reset_stats_zeroes_counters_but_keeps_calls(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    created = await invoke(client, single(callReferenceID="kept"))
    reset = (await client.post("/_emulator/reset-stats")).json()
    assert reset["requests"] == {}
    assert reset["calls_total"] == 0
    assert reset["calls_by_reference"] == {}
    assert (await get_call(client, created["callID"]))["callReferenceID"] == "kept"


async def test_settings_and_advance_over_http(
    client: httpx.AsyncClient, emulator: Emulator
) -> None:
    response = await client.post(
        "/_emulator/settings", json={"failure_rate": 1.0, "latency_max": 9}
    )
    assert response.status_code == 200
    assert response.json()["settings"]["failure_rate"] == 1.0
    assert "api_key" not in response.json()["settings"]
    assert emulator.settings.latency_max == 9

    created = await invoke(client, single())
    assert (await client.post("/_emulator/advance", json={"seconds": 9})).status_code == 200
    assert (await get_call(client, created["callID"]))["status"] == "failed"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/_emulator/settings", {"failure_rate": 2}, "failure_rate"),
        ("/_emulator/settings", {"latency_min": 5, "latency_max": 1}, "latency_min"),
        ("/_emulator/settings", {"no_such_knob": 1}, "no_such_knob"),
        ("/_emulator/advance", {"seconds": -1}, "seconds"),
        ("/_emulator/advance", {"seconds": "1"}, "seconds"),
    ],
)
async def test_control_routes_validate(
    client: httpx.AsyncClient, emulator: Emulator, path: str, body: dict[str, Any], message: str
) -> None:
    before = emulator.settings
    response = await client.post(path, json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert emulator.settings == before


def test_update_validates_and_keeps_the_old_settings_on_error() -> None:
    emulator = make_emulator()
    emulator.update(error_5xx_rate=0.25, workflows=["a"])
    assert (emulator.settings.error_5xx_rate, emulator.settings.workflows) == (0.25, ["a"])
    with pytest.raises(ConfigError, match="drop_rate"):
        emulator.update(drop_rate=-0.1)
    assert emulator.settings.drop_rate == 0.0


def test_advance_rejects_going_back() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        make_emulator().advance(-1)


def test_settings_reject_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'color'"):
        parse_settings({"color": "red"})
    with pytest.raises(ConfigError, match=r"failure_rate: must be <= 1"):
        parse_settings({"failure_rate": 1.5})
    with pytest.raises(ConfigError, match="latency_min"):
        parse_settings({"latency_min": 3, "latency_max": 1})
    with pytest.raises(TypeError, match="color"):
        EmulatorSettings(color="red")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="latency_min"):
        EmulatorSettings(latency_min=3, latency_max=1)
