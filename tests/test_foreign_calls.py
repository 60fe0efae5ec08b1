"""A call read back must be the call that was sent: a server that lost its state and hands out
the same call IDs again must never give one file another file's results."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.api import call_mismatch
from runner.api.models import Call
from runner.emulator import Emulator, EmulatorSettings
from tests.pipeline import drain_through, make_config, outbox_documents, write_files

pytestmark = pytest.mark.anyio


references = st.text(min_size=1, max_size=20)


@given(references, st.one_of(st.none(), references))
def test_a_call_is_trusted_only_with_the_reference_it_was_sent_with(
    sent: str, answered: str | None
) -> None:
    call = msgspec.convert({"callID": "c1", "callReferenceID": answered, "status": "running"}, Call)
    reason = call_mismatch(call, call_reference_id=sent)
    assert (reason is None) == (answered == sent)
    if reason is not None:
        assert repr(sent) in reason


@given(st.sets(references, max_size=4), st.lists(references, max_size=4))
def test_batch_events_must_name_items_that_were_sent(
    sent_items: set[str], event_references: list[str]
) -> None:
    outputs = [{"referenceID": ref, "eventType": "transform"} for ref in event_references]
    call = msgspec.convert(
        {"callID": "c1", "callReferenceID": "ref", "status": "completed", "outputs": outputs}, Call
    )
    reason = call_mismatch(call, call_reference_id="ref", item_reference_ids=sent_items)
    assert (reason is None) == (set(event_references) <= sent_items)


class ReusedCallIds:
    """The emulator, except that reads of one call come back carrying another call's reference
    (what a server that restarted and gave that call ID to someone else answers)."""

    def __init__(self, emulator: Emulator, victim_content: bytes) -> None:
        self._inner = httpx.ASGITransport(app=emulator.app)
        self._victim_content = victim_content
        self.victim_reference: str | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and self._victim_content in _input_content(request):
            self.victim_reference = json.loads(request.content)["callReferenceID"]
        response = await self._inner.handle_async_request(request)
        body = await response.aread()
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        if request.method != "GET" or not body.startswith(b"{"):
            return httpx.Response(response.status_code, headers=headers, content=body)
        document: dict[str, Any] = json.loads(body)
        for call in document.get("calls") or [document.get("call") or {}]:
            if call.get("callReferenceID") == self.victim_reference:
                call["callReferenceID"] = "someone-elses-call"
        return httpx.Response(response.status_code, headers=headers, json=document)


def _input_content(request: httpx.Request) -> bytes:
    document = json.loads(request.content)
    return base64.b64decode(document["input"]["singleFile"]["inputContent"])


async def test_a_reused_call_id_never_delivers_another_files_results(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [(f"wf/f{i}.txt", f"file {i}".encode()) for i in range(4)])
    server = ReusedCallIds(Emulator(EmulatorSettings(latency_min=0, latency_max=0)), b"file 2")
    outcome = await drain_through(config, server.handle)
    assert outcome.exit_code == 1  # one file ended in an error
    documents = outbox_documents(config.paths.outbox)
    assert sorted(documents) == [f"wf/f{i}.txt" for i in range(4)]
    kind, document = documents["wf/f2.txt"]
    assert kind == "error"
    assert "someone-elses-call" in document["reason"]
    assert not document.get("outputs")
    for i in (0, 1, 3):
        assert documents[f"wf/f{i}.txt"][0] == "result"
