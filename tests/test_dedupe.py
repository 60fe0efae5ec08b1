"""Content dedupe: the pure decision, and any interleaving of arrivals, sends, results and
deliveries played against a real SQLite store (the same statements the runner runs)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.dedupe import Candidate, ContentKey, Peer, Source, content_key, decide
from runner.route import Destination
from runner.store.base import Delivery, Finished, NewFile, Store
from runner.store.sqlite import open_sqlite_store

pytestmark = pytest.mark.anyio

KEYS = [ContentKey("a" * 64, "wf", "text"), ContentKey("b" * 64, "wf", "text")]
STATES = ["collecting", "ready", "waiting", "sending", "unknown", "polling", "terminal", "done"]

# -- the decision, pure ------------------------------------------------------------------------

peers_strategy = st.lists(
    st.tuples(st.integers(1, 30), st.sampled_from(STATES), st.sampled_from(KEYS), st.booleans()),
    max_size=12,
)


@given(
    candidate_ids=st.lists(st.integers(1, 30), unique=True, max_size=10),
    keys=st.lists(st.sampled_from(KEYS), min_size=10, max_size=10),
    others=peers_strategy,
    with_source=st.sets(st.sampled_from(KEYS)),
)
def test_a_decision_reuses_a_source_else_waits_only_for_a_peer_on_its_way(
    candidate_ids: list[int],
    keys: list[ContentKey],
    others: list[tuple[int, str, ContentKey, bool]],
    with_source: set[ContentKey],
) -> None:
    candidates = [Candidate(gid, keys[n]) for n, gid in enumerate(candidate_ids)]
    taken = set(candidate_ids)
    peers: dict[ContentKey, list[Peer]] = defaultdict(list)
    for c in candidates:  # a candidate is ready, and its own peer
        peers[c.key].append(Peer(c.call_row_id, "ready"))
    for gid, state, key, batch in others:
        if gid not in taken:
            taken.add(gid)
            peers[key].append(Peer(gid, state, batch))
    sources = {key: Source(file_id=7, call_id="c") for key in with_source}

    decisions = decide(candidates, sources, peers)

    assert [d.call_row_id for d in decisions] == candidate_ids
    for c, d in zip(candidates, decisions, strict=True):
        on_its_way = [
            p
            for p in peers[c.key]
            if p.call_row_id != c.call_row_id
            and p.state not in ("waiting", "done")
            and (p.state != "ready" or p.batch or p.call_row_id < c.call_row_id)
        ]
        if c.key in with_source:
            assert (d.action, d.source) == ("reuse", sources[c.key])
        elif on_its_way:
            assert (d.action, d.source) == ("wait", None)
        else:
            assert (d.action, d.source) == ("send", None)
    # of the ready single files of one content with nothing else on its way, the oldest goes
    for key in KEYS:
        busy = any(
            p.state not in ("ready", "waiting", "done") or (p.batch and p.state == "ready")
            for p in peers[key]
        )
        ready = sorted(p.call_row_id for p in peers[key] if p.state == "ready" and not p.batch)
        sent = [
            d.call_row_id for d in decisions if d.action == "send" and _key(candidates, d) == key
        ]
        if key not in with_source and not busy and ready and ready[0] in candidate_ids:
            assert sent == [ready[0]]
        else:
            assert sent == []


def _key(candidates: list[Candidate], decision: object) -> ContentKey:
    return next(
        c.key for c in candidates if c.call_row_id == getattr(decision, "call_row_id", None)
    )


def test_a_file_without_a_full_key_has_none() -> None:
    assert content_key("a" * 64, "wf", "text") == KEYS[0]
    assert content_key(None, "wf", "text") is None
    assert content_key("a" * 64, None, "text") is None
    assert content_key("a" * 64, "wf", None) is None


# -- any interleaving, against the store --------------------------------------------------------

Op = tuple[str, int]
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, len(KEYS) - 1)),
        st.tuples(st.just("arrive_batch"), st.integers(0, len(KEYS) - 1)),
        st.tuples(st.just("submit"), st.integers(1, 4)),
        st.tuples(st.just("succeed"), st.integers(0, 5)),
        st.tuples(st.just("fail"), st.integers(0, 5)),
        st.tuples(st.just("deliver"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=40,
)


@dataclass
class World:
    """What bem was asked and answered, as the store's stages would have told it."""

    calls: Counter[ContentKey] = field(default_factory=Counter)
    succeeded: set[ContentKey] = field(default_factory=set)
    in_flight: dict[int, ContentKey] = field(default_factory=dict)
    """Call id → the content of its bem call, while bem works on it."""
    documents: Counter[int] = field(default_factory=Counter)
    """File id → documents written."""
    results: set[int] = field(default_factory=set)
    """Files whose document is a result of their own call."""
    reused_from: dict[int, int] = field(default_factory=dict)
    errors: set[int] = field(default_factory=set)
    sent: set[int] = field(default_factory=set)
    """Files that went to bem in a call of their own."""
    files: int = 0
    now: float = 1.0


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=ops_strategy)
async def test_any_interleaving_sends_each_content_once_and_gives_each_file_one_document(
    tmp_path_factory: pytest.TempPathFactory, ops: list[Op]
) -> None:
    path = tmp_path_factory.mktemp("dedupe") / "state.db"
    world = World()
    segments: list[list[Op]] = [[]]
    for step in ops:
        if step[0] == "restart":
            segments.append([])
        else:
            segments[-1].append(step)
    for n, segment in enumerate(segments):
        async with open_sqlite_store(path) as store:  # each segment is one process's life
            await store.recover()
            for name, arg in segment:
                await _play(store, world, name, arg)
            if n < len(segments) - 1:
                continue
            # then everything ends, with no restart to wake what waits: bem answers every call
            for _ in range(50):
                await _play(store, world, "submit", 100)
                for _ in list(world.in_flight):
                    await _play(store, world, "succeed", 0)
                await _play(store, world, "deliver", 0)
                if await store.unfinished_work() == 0:
                    break
            assert await store.unfinished_work() == 0
            assert (await store.counts()).reused == len(world.reused_from)
    # every file has exactly one document
    assert world.documents == Counter(range(1, world.files + 1))
    # a reused document is always a result of a call of the same content
    assert set(world.reused_from.values()) <= world.results
    # a file ends in an error only from a call of its own: a failure is never passed on
    assert world.errors <= world.sent
    assert world.documents.keys() == world.errors | world.results | world.reused_from.keys()


async def _play(store: Store, world: World, op: str, arg: int) -> None:
    world.now += 1.0
    now = world.now
    if op in ("arrive", "arrive_batch"):
        world.files += 1
        key = KEYS[arg]
        mode: Literal["file", "folder"] = "file" if op == "arrive" else "folder"
        rel = f"wf/{world.files}.txt" if op == "arrive" else f"wf/{world.files}/item.txt"
        where = Destination(
            key.workflow, mode, rel.rsplit("/", 1)[0] if mode != "file" else rel, rel
        )
        new = NewFile(rel, 4, 1, key.sha256, key.input_type, where)
        await store.add_files([new], now=now, batch_limits={})
        for call in await store.collecting_calls():  # a folder of one file, closed at once
            await store.close_batch(call.id)
    elif op == "submit":
        ready = await store.ready_calls(now=now, limit=arg)
        settled = await store.settle_duplicates([g.id for g in ready], now=now)
        sent = [g for g in ready if g.id not in {*settled.reused, *settled.waiting}]
        if not sent:
            return
        await store.mark_sending([g.id for g in sent], now=now)
        files = await store.files_of_calls([g.id for g in sent])
        for call in sent:
            (file,) = files[call.id]
            key = ContentKey(file.sha256 or "", file.workflow or "", file.input_type or "")
            if not call.batch:  # a batch is always sent whole; a single file only if needed
                assert key not in world.in_flight.values(), "one content sent twice at once"
                assert key not in world.succeeded, "a content sent again after its result"
            world.calls[key] += 1
            world.sent.add(file.id)
            world.in_flight[call.id] = key
            await store.mark_submitted(
                call.id, call_id=f"call-{call.id}", status="pending", now=now, next_poll=now
            )
    elif op in ("succeed", "fail"):
        if not world.in_flight:
            return
        call_row_id = sorted(world.in_flight)[arg % len(world.in_flight)]
        key = world.in_flight.pop(call_row_id)
        if op == "succeed":
            world.succeeded.add(key)
            finished = Finished(call_row_id, "completed", '{"outputs": [{"ok": 1}]}', None)
        else:
            finished = Finished(call_row_id, "failed", None, "bem failed it")
        await store.mark_terminal([finished], now=now)
    elif op == "deliver":
        terminal = await store.terminal_calls(limit=1000)
        files = await store.files_of_calls([g.id for g in terminal])
        deliveries = []
        for call in terminal:
            for file in files[call.id]:
                if file.state != "queued":
                    continue
                world.documents[file.id] += 1
                outcome = "result" if call.status == "completed" else "error"
                if call.reused_file_id is not None:
                    world.reused_from[file.id] = call.reused_file_id
                elif outcome == "result":
                    world.results.add(file.id)
                else:
                    world.errors.add(file.id)
                deliveries.append(Delivery(file.id, outcome, None))
        await store.mark_delivered(deliveries, finished_calls=[g.id for g in terminal], now=now)
        await store.mark_done([d.file_id for d in deliveries], now=now)
