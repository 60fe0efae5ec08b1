"""Each stage on its own, one pass at a time, on a fake clock against the emulator over ASGI.

Time moves only when a test says so (:meth:`tests.stages.World.advance`), or, where a pass has
to wait inside the client (a 429's pause), while :class:`tests.fake_time.TimeMachine` runs it.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from runner.deliver import Deliverer
from runner.group import READY_MARKER, Grouper
from runner.health import AUTH_RETRY_SECONDS
from runner.poll import Poller
from runner.resolve import Resolver
from runner.schedule import PollPlan
from runner.store.base import WebhookEvent
from runner.submit import Submitter
from runner.watch import Watcher

from .conftest import frozen_emulator
from .fake_time import TimeMachine
from .pipeline import outbox_documents
from .stages import World, stage_world

pytestmark = pytest.mark.anyio

INVOKE = "POST /v3/workflows/{workflowName}/call"
LIST = "GET /v3/calls"


async def submit_pass(submitter: Submitter) -> float:
    """One pass of the submitter, and every POST it started answered."""
    async with anyio.create_task_group() as tg:
        wait = await submitter.submit_due(tg)
    return wait


def submitter_of(world: World) -> Submitter:
    return Submitter(world.ctx, preflight=world.watcher.confirm_unchanged)


async def states(world: World, *rels: str) -> list[str]:
    return [(await world.call_of(rel)).state for rel in rels]


# -- intake ----------------------------------------------------------------------------------


async def test_intake_takes_a_growing_file_only_once_it_has_settled(tmp_path: Path) -> None:
    async with stage_world(tmp_path, frozen_emulator(), inbox={"settle_seconds": 2}) as world:
        content = b""
        for line in range(10):  # appended every half second, for five seconds
            content += b"line %d\n" % line
            assert await world.take(("wf/growing.txt", content)) == 0
            world.advance(0.5)
        world.advance(1.4)
        assert await world.watcher.take(full=True) == 0  # quiet for 1.9 s: not yet
        world.advance(0.2)
        assert await world.watcher.take(full=True) == 1

        [file] = await world.files_of(await world.call_of("wf/growing.txt"))
        assert file.size == len(content)


async def test_intake_takes_a_file_an_event_names_long_before_the_rescan(tmp_path: Path) -> None:
    announce, announced = anyio.create_memory_object_stream[set[str]](1)

    async def events(inbox: Path, stop: anyio.Event) -> AsyncIterator[set[str]]:
        async with announced:
            async for paths in announced:
                yield paths

    async with stage_world(tmp_path, frozen_emulator(), inbox={"rescan_seconds": 3600}) as world:
        watcher = Watcher(world.ctx, events=events)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await world.clock.wait_for_sleepers(1)  # the first scan is done: it waits
            world.drop(("wf/new.txt", b"new"))
            await announce.send({str(world.ctx.config.paths.inbox / "wf/new.txt")})
            await world.ctx.nudges.group.wait(math.inf)  # told: files were taken
            assert world.clock.now() == 0.0  # no time has passed: no rescan found it
            assert "wf/new.txt" in await world.store.known_files()
            world.ctx.stop()


async def test_a_file_changed_after_it_was_queued_is_taken_anew_never_sent_stale(
    tmp_path: Path,
) -> None:
    async with stage_world(tmp_path, frozen_emulator()) as world:
        await world.take(("wf/a.txt", b"first"), ("wf/b.txt", b"will vanish"))
        world.drop(("wf/a.txt", b"second, longer"))
        (world.ctx.config.paths.inbox / "wf/b.txt").unlink()

        submitter = submitter_of(world)
        for _ in range(2):  # one call at a time until bem has answered once
            await submit_pass(submitter)

        assert world.requests(INVOKE) == {}
        assert await world.watcher.take(full=True) == 1  # the new version
        [file] = await world.files_of(await world.call_of("wf/a.txt"))
        assert file.size == len(b"second, longer")


# -- grouper ---------------------------------------------------------------------------------


async def test_a_folder_closes_once_quiet_for_the_settle_time(tmp_path: Path) -> None:
    async with stage_world(tmp_path, frozen_emulator(), inbox={"settle_seconds": 5}) as world:
        world.drop(("wf/box/a.txt", b"a"))
        world.advance(5)  # settled: taken on sight
        await world.watcher.take(full=True)
        grouper = Grouper(world.ctx, unsettled_under=world.watcher.has_pending_under)
        world.advance(3)
        await world.take(("wf/box/b.txt", b"b"))  # still settling: the folder stays open
        assert await grouper.close_due() == pytest.approx(2)  # a has been quiet for 3 of 5 s
        world.advance(2)
        await grouper.close_due()
        assert await states(world, "wf/box/a.txt") == ["collecting"]

        world.advance(3)
        await world.watcher.take(full=True)  # b has settled and joins the folder
        assert await grouper.close_due() == pytest.approx(5)  # quiet since b was added
        world.advance(5)
        await grouper.close_due()
        assert await states(world, "wf/box/a.txt", "wf/box/b.txt") == ["ready", "ready"]


async def test_a_ready_marker_closes_a_folder_at_once(tmp_path: Path) -> None:
    async with stage_world(tmp_path, frozen_emulator(), inbox={"settle_seconds": 3600}) as world:
        world.drop(("wf/box/a.txt", b"a"), age=3600)
        await world.watcher.take(full=True)
        grouper = Grouper(world.ctx, unsettled_under=world.watcher.has_pending_under)
        await grouper.close_due()
        assert await states(world, "wf/box/a.txt") == ["collecting"]

        world.drop((f"wf/box/{READY_MARKER}", b""))
        await grouper.close_due()
        assert await states(world, "wf/box/a.txt") == ["ready"]


# -- submitter -------------------------------------------------------------------------------


async def test_one_post_until_the_key_is_accepted_then_one_probe_a_minute(tmp_path: Path) -> None:
    emulator = frozen_emulator(api_key="the-right-key")
    async with stage_world(tmp_path, emulator) as world:
        await world.take(*((f"wf/{n}.txt", b"doc %d" % n) for n in range(5)))
        submitter = submitter_of(world)

        await submit_pass(submitter)
        assert world.requests(INVOKE) == {"401": 1}
        assert world.ctx.health.auth_error is not None
        for _ in range(5):  # most of a minute of passes: nothing more is sent
            world.advance(AUTH_RETRY_SECONDS / 6)
            await submit_pass(submitter)
        assert world.requests(INVOKE) == {"401": 1}

        world.advance(AUTH_RETRY_SECONDS / 6)
        await submit_pass(submitter)
        assert world.requests(INVOKE) == {"401": 2}  # one probe, not one POST per file
        assert world.emulator.stats()["calls_total"] == 0


async def test_until_bem_answers_once_only_one_post_is_in_flight(tmp_path: Path) -> None:
    async with stage_world(tmp_path, frozen_emulator()) as world:
        await world.take(*((f"wf/{n}.txt", b"doc %d" % n) for n in range(6)))
        submitter = submitter_of(world)

        await submit_pass(submitter)
        assert world.requests(INVOKE) == {"202": 1}
        await submit_pass(submitter)  # the key is accepted: the rest at once
        assert world.requests(INVOKE) == {"202": 6}


async def test_a_429_sends_the_call_again_after_retry_after_and_creates_one_bem_call(
    tmp_path: Path,
) -> None:
    emulator = frozen_emulator(rate_limit_rps=0.1, rate_limit_burst=1)
    async with stage_world(tmp_path, emulator) as world:
        await world.take(("wf/a.txt", b"a"), ("wf/b.txt", b"b"))
        submitter = submitter_of(world)
        await submit_pass(submitter)  # the first POST takes bem's only token
        machine = TimeMachine(world.clock, world.emulator)

        await machine.run(lambda: submit_pass(submitter))  # the second: 429
        assert world.requests(INVOKE) == {"202": 1, "429": 1}
        assert sorted(await states(world, "wf/a.txt", "wf/b.txt")) == ["polling", "ready"]

        await machine.run(lambda: submit_pass(submitter))  # held until bem has a token
        assert world.requests(INVOKE) == {"202": 2, "429": 1}
        assert machine.moved >= 1 / 0.1 - 1e-9  # Retry-After was waited for, in fake time
        assert set(world.emulator.stats()["calls_by_reference"].values()) == {1}
        assert await states(world, "wf/a.txt", "wf/b.txt") == ["polling", "polling"]


async def test_an_unknown_outcome_is_adopted_once_listed_never_sent_again(tmp_path: Path) -> None:
    # the POST creates its call and answers 500; the listing shows the call only after 10 s
    emulator = frozen_emulator(accept_then_500_rate=1.0, list_visibility_lag=10)
    async with stage_world(tmp_path, emulator, api={"visibility_window": "30s"}) as world:
        await world.take(("wf/a.txt", b"a"))
        submitter = submitter_of(world)
        resolver = Resolver(world.ctx)
        await submit_pass(submitter)
        assert await states(world, "wf/a.txt") == ["unknown"]

        for _ in range(4):  # listed, not found yet: still within the window, so no resend
            world.advance(2)
            await resolver.resolve_due()
        assert world.requests(INVOKE) == {"500": 1}
        assert await states(world, "wf/a.txt") == ["unknown"]

        world.advance(3)
        await resolver.resolve_due()
        call = await world.call_of("wf/a.txt")
        assert call.state == "polling"
        assert call.call_id is not None
        assert world.requests(INVOKE) == {"500": 1}
        assert world.emulator.stats()["calls_total"] == 1


async def test_a_call_never_created_is_sent_again_only_after_the_visibility_window(
    tmp_path: Path,
) -> None:
    emulator = frozen_emulator(error_5xx_rate=1.0)
    async with stage_world(tmp_path, emulator, api={"visibility_window": "30s"}) as world:
        await world.take(("wf/a.txt", b"a"))
        submitter = submitter_of(world)
        machine = TimeMachine(world.clock, world.emulator)
        await machine.run(lambda: submit_pass(submitter))
        posts = sum(world.requests(INVOKE).values())
        assert await states(world, "wf/a.txt") == ["unknown"]
        sent_at = (await world.call_of("wf/a.txt")).sent_at
        assert sent_at is not None

        world.emulator.update(error_5xx_rate=0.0)
        while world.clock.wall() < sent_at + 30:
            assert await states(world, "wf/a.txt") == ["unknown"]
            world.advance(2)
            await Resolver(world.ctx).resolve_due()
        assert await states(world, "wf/a.txt") == ["ready"]
        assert sum(world.requests(INVOKE).values()) == posts

        await submit_pass(submitter)
        assert world.emulator.stats()["calls_total"] == 1


# -- poller ----------------------------------------------------------------------------------


async def test_polls_back_off_and_one_request_answers_for_many_calls(tmp_path: Path) -> None:
    emulator = frozen_emulator(latency=60)
    poll = {"initial_seconds": 1, "max_seconds": 8}
    async with stage_world(tmp_path, emulator, poll=poll) as world:
        await world.take(*((f"wf/{n}.txt", b"doc %d" % n) for n in range(5)))
        submitter = submitter_of(world)
        await submit_pass(submitter)
        await submit_pass(submitter)
        poller = Poller(world.ctx)

        waits = []
        while world.clock.now() < 70:
            waits.append(await poller.poll_due())
            world.advance(waits[-1])
        # five calls followed for a minute: at most one request per look, and the looks spread
        # out as each call's schedule backs off, to the maximum and no further
        assert sum(world.requests(LIST).values()) <= len(waits) < 5 * 70 / 8
        assert 4 < max(waits) <= 8
        assert {(await world.call_of(f"wf/{n}.txt")).state for n in range(5)} == {"terminal"}


async def test_the_poller_tells_the_grid_when_a_due_call_was_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page holding a call bem announced (a webhook event) is fetched off the grid
    (``PollPlan.may_send``, tests/test_schedule.py); the poller says which pages those are."""
    emulator = frozen_emulator(latency=600)
    async with stage_world(tmp_path, emulator) as world:
        await world.take(("wf/a.txt", b"a"), ("wf/b.txt", b"b"))
        submitter = submitter_of(world)
        await submit_pass(submitter)  # one POST until bem has answered once
        await submit_pass(submitter)
        asked: list[bool] = []
        may_send = PollPlan.may_send

        def recording(
            plan: PollPlan, now: float, *, calls: int, per_request: int, announced: bool = False
        ) -> bool:
            asked.append(announced)
            return may_send(plan, now, calls=calls, per_request=per_request, announced=announced)

        monkeypatch.setattr(PollPlan, "may_send", recording)
        poller = Poller(world.ctx)
        while not asked:  # the first look at the calls
            world.advance(await poller.poll_due())
        call = await world.call_of("wf/a.txt")
        now = world.clock.wall()
        event = WebhookEvent("e1", "transform", call.call_id, call.call_reference_id)
        await world.ctx.store.record_webhook_event(event, now=now, confirm_at=now + 0.2)
        world.advance(0.2)
        looked = sum(world.requests(LIST).values())

        await poller.poll_due()

        assert asked[0] is False
        assert asked[-1] is True
        assert sum(world.requests(LIST).values()) == looked + 1


async def test_a_call_followed_past_give_up_after_ends_timed_out(tmp_path: Path) -> None:
    emulator = frozen_emulator(latency=10_000)
    poll = {"initial_seconds": 1, "max_seconds": 30, "give_up_after": "5m"}
    async with stage_world(tmp_path, emulator, poll=poll) as world:
        await world.take(("wf/stuck.txt", b"stuck"))
        await submit_pass(submitter_of(world))
        poller = Poller(world.ctx)

        while world.clock.now() < 299:
            world.advance(min(await poller.poll_due(), 299 - world.clock.now()))
        assert (await world.call_of("wf/stuck.txt")).state == "polling"
        world.advance(30)
        await poller.poll_due()

        call = await world.call_of("wf/stuck.txt")
        assert call.state == "terminal"
        assert call.error_reason is not None
        assert call.error_reason.startswith("timed out")


async def test_v2_calls_are_polled_together_through_the_v3_listing(tmp_path: Path) -> None:
    emulator = frozen_emulator(latency=5)
    poll = {"initial_seconds": 1, "max_seconds": 2}
    async with stage_world(tmp_path, emulator, api={"version": "v2"}, poll=poll) as world:
        await world.take(("wf/a.txt", b"a"), ("wf/b.txt", b"b"))
        submitter = submitter_of(world)
        await submit_pass(submitter)
        await submit_pass(submitter)
        poller = Poller(world.ctx)

        while world.clock.now() < 20:
            world.advance(await poller.poll_due())

        assert sum(world.requests("POST /v2/calls").values()) == 2
        assert sum(world.requests(LIST).values()) >= 1
        assert world.requests("GET /v2/calls/{callID}") == {}
        assert world.requests("GET /v3/calls/{callID}") == {}
        assert await states(world, "wf/a.txt", "wf/b.txt") == ["terminal", "terminal"]
        for rel in ("wf/a.txt", "wf/b.txt"):  # the outputs came with the listing
            result = json.loads((await world.call_of(rel)).result_json or "{}")
            assert result["outputs"], rel


# -- deliverer -------------------------------------------------------------------------------


async def test_a_finished_call_becomes_one_document_per_file(tmp_path: Path) -> None:
    emulator = frozen_emulator(latency=1)
    poll = {"initial_seconds": 1, "max_seconds": 2}
    async with stage_world(tmp_path, emulator, poll=poll) as world:
        await world.take(("wf/box/a.txt", b"a"), ("wf/box/b.txt", b"BEM-EMULATOR-FAIL"))
        world.ctx.inbox_taken.set()
        await Grouper(world.ctx, unsettled_under=world.watcher.has_pending_under).close_due()
        await submit_pass(submitter_of(world))
        world.advance(2)
        await Poller(world.ctx).poll_due()
        finished: list[str] = []
        deliverer = Deliverer(
            world.ctx, on_finished=lambda file, *, left_in_inbox: finished.append(file.rel)
        )

        await deliverer.deliver_due()

        documents = outbox_documents(world.ctx.config.paths.outbox)
        assert {rel: kind for rel, (kind, _) in documents.items()} == {
            "wf/box/a.txt": "result",
            "wf/box/b.txt": "error",
        }
        assert sorted(finished) == ["wf/box/a.txt", "wf/box/b.txt"]
        assert (world.ctx.config.paths.archive / "wf/box/a.txt").read_bytes() == b"a"
        assert await world.store.unfinished_work() == 0
