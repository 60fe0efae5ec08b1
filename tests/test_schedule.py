"""The poll schedule (:mod:`runner.schedule`): pure functions, property-tested."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import msgspec
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from runner.schedule import (
    ALLOWANCE_PER_CALL,
    COLD_POLLS,
    INITIAL_CREDITS,
    MIN_SAMPLES,
    OVERDUE_FACTOR,
    POLL_SHARE,
    PRIORITY_SPREAD,
    SAMPLES_KEPT,
    START_QUANTILE,
    TICK_QUANTUM,
    Grid,
    Latencies,
    Outlook,
    PollPlan,
    finished_since,
    grid_for,
    next_poll_at,
    on_grid,
    poll_credits,
    quantized,
    ride_along_seconds,
)
from runner.webhook_policy import CONFIRM_WINDOW_SECONDS

seconds = st.floats(min_value=0.01, max_value=600.0, allow_nan=False)
samples = st.lists(seconds, min_size=MIN_SAMPLES, max_size=60)
fractions = st.floats(min_value=0.0, max_value=1.0)
ticks = st.floats(min_value=0.05, max_value=30.0)
moments = st.floats(min_value=1e6, max_value=2e9)  # wall clock seconds


def learnt(values: list[float]) -> Latencies:
    latencies = Latencies.of(values)
    assert latencies is not None
    return latencies


def schedule(
    *,
    now: float,
    age: float,
    latencies: Latencies | None,
    tick: float | None,
    attempts: int = 1,
    maximum: float = 30.0,
    seed: int = 0,
) -> float:
    return next_poll_at(
        now=now,
        submitted_at=now - age,
        attempts=attempts,
        latencies=latencies,
        tick=tick,
        initial=1.0,
        maximum=maximum,
        rng=random.Random(seed),
    )


# -- the learnt distribution ---------------------------------------------------------------------


def test_nothing_is_learnt_from_too_few_calls() -> None:
    assert Latencies.of([1.0] * (MIN_SAMPLES - 1)) is None
    assert Latencies.of([1.0, math.nan, 2.0, 3.0, 4.0]) is None  # a NaN is no sample
    assert Latencies.of([1.0] * MIN_SAMPLES) is not None


@given(values=samples, low=fractions, high=fractions)
def test_quantiles_are_samples_monotone_in_the_fraction(
    values: list[float], low: float, high: float
) -> None:
    latencies = learnt(values)
    low, high = sorted((low, high))
    assert latencies.quantile(low) <= latencies.quantile(high)
    assert latencies.quantile(low) in values
    assert latencies.quantile(1.0) == latencies.longest == max(values)
    # at least that fraction of the samples are no longer than the quantile
    assert latencies.cdf(latencies.quantile(low)) >= low


@given(values=samples, a=seconds, b=seconds, c=seconds)
def test_the_chance_of_having_finished_is_a_probability_growing_with_age(
    values: list[float], a: float, b: float, c: float
) -> None:
    latencies = learnt(values)
    then, sooner, later = sorted((a, b, c))
    p_sooner = finished_since(latencies, age_then=then, age_at=sooner)
    p_later = finished_since(latencies, age_then=then, age_at=later)
    assert 0.0 <= p_sooner <= p_later <= 1.0
    assert finished_since(latencies, age_then=latencies.longest, age_at=later) == 1.0


# -- the grid ------------------------------------------------------------------------------------


@given(at=moments, tick=ticks)
def test_the_grid_point_is_the_first_at_or_after(at: float, tick: float) -> None:
    slot = on_grid(at, tick)
    assert at <= slot <= at + tick * (1 + 1e-9)
    assert math.isclose(slot / tick, round(slot / tick), abs_tol=1e-6)
    assert on_grid(slot, tick) == slot  # a point is its own point: placed again, it stays


@given(k=st.integers(0, 10**9), tick=ticks)
def test_every_multiple_of_the_tick_is_a_point(k: int, tick: float) -> None:
    assert on_grid(k * tick, tick) == k * tick


def base_outlook(**changes: object) -> Outlook:
    values: dict[str, object] = {
        "submits_pending": True,
        "rate": 20.0,
        "open_calls": 80,
        "calls_per_request": 50,
        "credits": 30.0,
        "horizon": 6.0,
    }
    values.update(changes)
    return Outlook(**values)  # type: ignore[arg-type]


outlooks = st.builds(
    Outlook,
    submits_pending=st.booleans(),
    rate=st.floats(min_value=0.1, max_value=1000.0),
    open_calls=st.integers(min_value=0, max_value=5000),
    calls_per_request=st.integers(min_value=1, max_value=100),
    credits=st.floats(min_value=-100.0, max_value=1e4),
    horizon=st.floats(min_value=0.0, max_value=3600.0),
)


def grid(outlook: Outlook, base: float = 1.0, **changes: object) -> Grid:
    chosen = grid_for(msgspec.structs.replace(outlook, **changes), base=base)
    assert chosen is not None
    return chosen


@given(outlook=outlooks, base=st.floats(min_value=0.001, max_value=60.0))
def test_polls_never_take_more_than_their_share_of_the_rate_or_credits(
    outlook: Outlook, base: float
) -> None:
    chosen = grid_for(outlook, base=base)
    if outlook.credits < 1:  # no credits: one request a grid point, never fewer
        assert chosen.requests == 1
        assert chosen.tick >= base
        return
    assert chosen.tick > 0
    assert chosen.requests >= 1
    needed = max(1, math.ceil(outlook.open_calls / outlook.calls_per_request))
    assert chosen.requests <= max(1, min(needed, math.floor(outlook.credits)))
    share = POLL_SHARE if outlook.submits_pending else 1.0
    assert chosen.requests / chosen.tick <= share * outlook.rate * (1 + 1e-9)
    if outlook.submits_pending:
        assert chosen.tick >= base
        # what new calls earn meanwhile, at most (but always one request)
        earned = ALLOWANCE_PER_CALL * outlook.rate * chosen.tick
        assert chosen.requests == 1 or chosen.requests <= earned
    else:  # the tail spends no more than the credits left until the calls are due to be done
        spent = chosen.requests * max(outlook.horizon, chosen.tick) / chosen.tick
        assert spent <= outlook.credits * (1 + 1e-9)


@given(
    outlook=st.builds(
        Outlook,
        submits_pending=st.booleans(),
        rate=st.floats(min_value=10.0, max_value=1000.0),
        open_calls=st.integers(min_value=0, max_value=500),
        calls_per_request=st.integers(min_value=10, max_value=100),
        credits=st.floats(min_value=500.0, max_value=1e4),
        horizon=st.floats(min_value=0.0, max_value=10.0),
    )
)
def test_once_nothing_is_left_to_submit_the_grid_tightens(outlook: Outlook) -> None:
    assume(outlook.credits >= 1 and outlook.rate >= 10 and outlook.calls_per_request >= 10)
    needed = max(1, math.ceil(outlook.open_calls / outlook.calls_per_request))
    assume(outlook.credits >= 8 * needed * max(outlook.horizon, 1))  # credits for a tighter grid
    pending = grid(outlook, submits_pending=True)
    tail = grid(outlook, submits_pending=False)
    assert tail.requests / tail.tick >= pending.requests / pending.tick  # polls at least as often


@given(
    outlook=outlooks,
    more_credits=st.floats(min_value=0.0, max_value=1e3),
    more_rate=st.floats(min_value=0.0, max_value=100.0),
    longer=st.floats(min_value=0.0, max_value=100.0),
)
def test_the_grid_is_monotone_in_what_it_depends_on(
    outlook: Outlook, more_credits: float, more_rate: float, longer: float
) -> None:
    # the grid's quantum and whole requests make it a step function: compare in whole quanta
    assume(outlook.credits >= 1 and outlook.rate >= 10 and outlook.calls_per_request >= 10)
    chosen = grid(outlook)
    for faster in (
        grid(outlook, credits=outlook.credits + more_credits),
        grid(outlook, rate=outlook.rate + more_rate),
    ):  # more to spend: requests no further apart
        assert faster.tick / faster.requests <= chosen.tick / chosen.requests + TICK_QUANTUM
    slower = grid(outlook, horizon=outlook.horizon + longer)
    assert slower.tick / slower.requests >= chosen.tick / chosen.requests - TICK_QUANTUM


def test_the_example_of_the_issue_polls_each_second_then_about_four_times_a_second() -> None:
    assert grid_for(base_outlook(), base=1.0) == Grid(1.0, 2)  # 80 open calls: two pages
    assert grid_for(base_outlook(open_calls=40), base=1.0) == Grid(1.0, 1)
    tail = base_outlook(submits_pending=False, open_calls=40, credits=25.0)
    assert grid_for(tail, base=1.0) == Grid(0.25, 1)


def test_a_grid_point_takes_its_requests_and_no_more() -> None:
    plan = PollPlan(grid=Grid(tick=1.0, requests=2))
    assert plan.may_send(9.99, calls=50, per_request=50)
    plan.sent(9.99)
    plan.sent(10.01)
    assert not plan.may_send(10.02, calls=50, per_request=50)  # spent: wait for the next point
    assert math.isclose(plan.next_slot_in(10.02), 11.0 - PRIORITY_SPREAD - 10.02, abs_tol=1e-5)
    assert plan.may_send(11.0 - PRIORITY_SPREAD, calls=50, per_request=50)
    plan.grid = None  # off the grid nothing holds a request back
    assert plan.may_send(10.02, calls=50, per_request=50)
    assert plan.next_slot_in(10.02) == 0.0
    assert plan.requests == 2


def test_a_call_bem_announced_is_fetched_without_waiting_for_the_next_grid_point() -> None:
    plan = PollPlan(grid=Grid(tick=1.0, requests=1))
    plan.sent(10.01)
    assert not plan.may_send(10.02, calls=1, per_request=50)  # the point is spent
    # a webhook event said one of the due calls has finished: its outputs are fetched now
    assert plan.may_send(10.02, calls=1, per_request=50, announced=True)


@given(
    grid=st.builds(Grid, tick=ticks, requests=st.integers(1, 5)),
    gaps=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=60),
)
def test_no_grid_point_takes_more_requests_than_the_grid_allows(
    grid: Grid, gaps: list[float]
) -> None:
    plan = PollPlan(grid=grid)
    now, sent = 1000.0, []
    for gap in gaps:
        now += gap
        if not plan.may_send(now, calls=50, per_request=50):
            now += plan.next_slot_in(now)
            assert plan.may_send(now, calls=50, per_request=50)
        plan.sent(now)
        sent.append(grid.point(now))
    assert max(sent.count(point) for point in sent) <= grid.requests


@given(tick=st.floats(min_value=1e-3, max_value=1e4))
def test_ticks_are_whole_quanta_and_never_shorter(tick: float) -> None:
    assert tick <= quantized(tick) < tick + TICK_QUANTUM * (1 + 1e-6)
    assert math.isclose(quantized(tick) / TICK_QUANTUM, round(quantized(tick) / TICK_QUANTUM))


# -- one call's next poll ------------------------------------------------------------------------


@given(
    now=moments,
    age=st.floats(min_value=0.0, max_value=1e5),
    values=st.none() | samples,
    tick=st.none() | ticks,
    attempts=st.integers(min_value=0, max_value=100),
    maximum=st.floats(min_value=1.0, max_value=3600.0),
    seed=st.integers(0, 2**32),
)
def test_the_next_poll_is_never_before_now_and_never_far(
    now: float,
    age: float,
    values: list[float] | None,
    tick: float | None,
    attempts: int,
    maximum: float,
    seed: int,
) -> None:
    latencies = Latencies.of(values) if values else None
    at = schedule(now=now, age=age, latencies=latencies, tick=tick, attempts=attempts,
                  maximum=maximum, seed=seed)  # fmt: skip
    assert at >= now
    step = tick if tick is not None and latencies is not None else 0.0
    assert at <= now + max(maximum, step) + step + 1e-6 * now


@given(now=moments, values=samples, tick=ticks)
def test_a_new_call_is_first_polled_once_the_fastest_calls_would_have_finished(
    now: float, values: list[float], tick: float
) -> None:
    latencies = learnt(values)
    at = schedule(now=now, age=0.0, latencies=latencies, tick=tick, attempts=0, maximum=1e6)
    start = latencies.quantile(START_QUANTILE)
    assert at >= now + start - tick * PRIORITY_SPREAD - 1e-6 * now
    assert at <= now + max(start, tick / 2) + tick + 1e-6 * now


@given(now=moments, values=samples, tick=ticks, slower=st.floats(0.0, 100.0))
def test_slower_workflows_are_polled_no_sooner(
    now: float, values: list[float], tick: float, slower: float
) -> None:
    fast = learnt(values)
    slow = learnt([v + slower for v in values])
    first_fast = schedule(now=now, age=0.0, latencies=fast, tick=tick, maximum=1e6)
    first_slow = schedule(now=now, age=0.0, latencies=slow, tick=tick, maximum=1e6)
    assert first_slow >= first_fast - tick * PRIORITY_SPREAD


@given(now=moments, values=samples, tick=ticks, a=st.floats(0, 1e4), b=st.floats(0, 1e4))
def test_overdue_calls_back_off_as_they_grow_older(
    now: float, values: list[float], tick: float, a: float, b: float
) -> None:
    latencies = learnt(values)
    overdue = OVERDUE_FACTOR * latencies.longest + tick
    younger, older = sorted((a, b))
    wait_younger = schedule(now=now, age=overdue + younger, latencies=latencies, tick=tick) - now
    wait_older = schedule(now=now, age=overdue + older, latencies=latencies, tick=tick) - now
    assert wait_younger <= wait_older + tick * (1 + PRIORITY_SPREAD) + 1e-6 * now


@given(now=moments, values=samples, tick=ticks, ages=st.lists(st.floats(0, 1e3), min_size=2))
@example(now=99745282.0, values=[1.0] * 4 + [31.0], tick=13.329681274299618, ages=[1.0, 64.0])
def test_calls_due_at_one_tick_share_a_request_most_likely_first(
    now: float, values: list[float], tick: float, ages: list[float]
) -> None:
    latencies = learnt(values)
    ride = ride_along_seconds(Grid(tick, 1), initial=1.0)
    polls = [(schedule(now=now, age=age, latencies=latencies, tick=tick), age) for age in ages]
    for at, age in polls:
        slot = on_grid(at, tick)
        for other_at, other_age in polls:
            if on_grid(other_at, tick) != slot:
                continue
            assert abs(other_at - at) <= ride + 1e-6 * now  # one request takes both
            mine, theirs = (
                finished_since(latencies, age_then=now - (now - a), age_at=slot - (now - a))
                for a in (age, other_age)
            )
            if mine > theirs and min(at, other_at) > now:  # (one polled at once is first anyway)
                assert at <= other_at


@given(
    now=moments,
    age=st.floats(0, 1e3),
    attempts=st.integers(0, COLD_POLLS - 1),
    tick=st.none() | ticks,
    seed=st.integers(0, 99),
)
def test_before_its_latencies_are_learnt_a_call_is_first_polled_on_the_initial_grid(
    now: float, age: float, attempts: int, tick: float | None, seed: int
) -> None:
    at = schedule(now=now, age=age, latencies=None, tick=tick, attempts=attempts, seed=seed)
    assert now + 0.5 - 1e-6 * now <= at <= now + 1.5 + 1e-6 * now
    assert at == on_grid(at, 1.0)  # calls polled together share one request


@given(
    now=moments,
    age=st.floats(0, 1e3),
    attempts=st.integers(COLD_POLLS, 60),
    tick=st.none() | ticks,
    seed=st.integers(0, 99),
)
def test_before_its_latencies_are_learnt_a_call_then_backs_off_exponentially(
    now: float, age: float, attempts: int, tick: float | None, seed: int
) -> None:
    at = schedule(now=now, age=age, latencies=None, tick=tick, attempts=attempts, seed=seed)
    step = min(30.0, 1.0 * 2.0 ** (attempts - COLD_POLLS + 1))
    assert now + step / 2 - 1e-6 * now <= at <= now + min(30.0, step) + 1e-6 * now


# -- the request budget, over a whole drain ------------------------------------------------------


@dataclass
class SimCall:
    workflow: str
    submitted: float
    latency: float
    not_before: float
    attempts: int = 0
    done: bool = False
    lag: float = 0.0
    """Seconds from the call's end to the poll that saw it."""


@dataclass
class Drain:
    requests: int
    """Poll requests sent."""
    plan: PollPlan
    calls: list[SimCall]
    unpaid: list[float] = field(default_factory=list)
    """When the requests sent with no credit left went out (the floor of :func:`grid_for`)."""


def simulate_drain(*, files: int, rate: float, low: float, high: float, seed: int) -> Drain:
    """The poller and the first-poll rule of :mod:`runner.resolve` on virtual time: one call per
    file submitted at ``rate`` per second, each taking a uniform ``low``-``high`` seconds."""
    rng = random.Random(seed)
    plan = PollPlan()
    calls: list[SimCall] = []
    now = 0.0
    requests = 0
    unpaid: list[float] = []

    def first_poll(at: float) -> float:
        plan.started(at)
        latencies = plan.latencies("wf")
        if latencies is None or plan.tick is None:
            return at + 1.0
        return next_poll_at(now=at, submitted_at=at, attempts=0, latencies=latencies,
                            tick=plan.tick, initial=1.0, maximum=30.0, rng=rng)  # fmt: skip

    def choose_grid() -> None:
        plan.grid = (
            None
            if plan.longest == 0
            else grid_for(
                Outlook(
                    submits_pending=len(calls) < files,
                    rate=rate,
                    open_calls=sum(not c.done for c in calls),
                    calls_per_request=50,
                    credits=plan.credits,
                    horizon=plan.horizon(now),
                ),
                base=1.0,
            )
        )

    while True:
        open_calls = [c for c in calls if not c.done]
        next_submit = len(calls) / rate if len(calls) < files else math.inf
        next_due = min((c.not_before for c in open_calls), default=math.inf)
        if math.isinf(next_submit) and math.isinf(next_due):
            return Drain(requests, plan, calls, unpaid)
        if next_submit <= next_due:
            now = next_submit
            latency = rng.uniform(low, high)
            calls.append(SimCall("wf", now, latency, first_poll(now)))
            continue
        now = next_due
        choose_grid()
        ride = ride_along_seconds(plan.grid, initial=1.0)
        due = sorted((c for c in open_calls if c.not_before <= now + ride),
                     key=lambda c: c.not_before)  # fmt: skip
        relearnt = False
        for page in range(0, len(due), 50):
            if not plan.may_send(now, calls=len(due) - page, per_request=50):
                for call in due[page:]:  # what the poller does: look again at the next point
                    call.not_before = now + plan.next_slot_in(now)
                break
            requests += 1
            if plan.credits < 1:
                unpaid.append(now)
            plan.sent(now)
            for call in due[page : page + 50]:
                if call.submitted + call.latency <= now:
                    call.done = True
                    call.lag = now - call.submitted - call.latency
                    if plan.learn(call.workflow, call.latency):
                        relearnt = True
                    continue
                call.attempts += 1
                call.not_before = next_poll_at(
                    now=now, submitted_at=call.submitted, attempts=call.attempts,
                    latencies=plan.latencies(call.workflow), tick=plan.tick, initial=1.0,
                    maximum=30.0, rng=rng,
                )  # fmt: skip
        if relearnt:  # as the poller does: every open call moves to the learnt schedule
            choose_grid()
            for call in calls:
                if not call.done:
                    call.not_before = next_poll_at(
                        now=now, submitted_at=call.submitted, attempts=call.attempts,
                        latencies=plan.latencies(call.workflow), tick=plan.tick, initial=1.0,
                        maximum=30.0, rng=rng,
                    )  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    files=st.integers(min_value=300, max_value=600),
    rate=st.floats(min_value=10.0, max_value=100.0),
    low=st.floats(min_value=0.5, max_value=3.0),
    spread=st.floats(min_value=0.0, max_value=3.0),
    seed=st.integers(0, 2**16),
)
@example(files=300, rate=10.0, low=2.875, spread=3.0, seed=0)  # requests with no credit left
def test_a_drain_spends_at_most_its_allowance_of_polls(
    files: int, rate: float, low: float, spread: float, seed: int
) -> None:
    """Holds where a page of polls is shared by many calls (hundreds of files, calls of seconds
    at >= 10 req/s); a small drain at a low rate can spend more (one request per grid point
    is the floor), e.g. 0.16-0.3 per file for 100 files at 5 req/s."""
    drain = simulate_drain(files=files, rate=rate, low=low, high=low + spread, seed=seed)
    assert drain.plan.calls == files
    paid = drain.requests - len(drain.unpaid)
    assert paid <= poll_credits(calls=0, requests=0) + ALLOWANCE_PER_CALL * files + 3
    # with no credit left, one request per point of a grid of ``poll.initial_seconds`` (1 s)
    points = [round(at) for at in drain.unpaid]
    assert len(set(points)) == len(points)
    assert drain.requests / files <= 0.15


def test_credits_are_what_the_calls_earned_less_what_was_spent() -> None:
    assert poll_credits(calls=0, requests=0) == INITIAL_CREDITS
    assert poll_credits(calls=100, requests=10) == INITIAL_CREDITS + 100 * ALLOWANCE_PER_CALL - 10
    plan = PollPlan()
    assert plan.latencies("wf") is None
    assert plan.horizon(0.0) == 0.0
    for seconds_taken in (3.0, 1.0, 2.0, 5.0, 4.0):
        plan.learn("wf", seconds_taken)
    latencies = plan.latencies("wf")
    assert latencies is not None
    assert latencies.ascending == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert plan.longest == 5.0
    assert plan.latencies("other") is None


# -- learnt latencies, kept sorted as samples come and go ------------------------------------------

any_seconds = st.one_of(
    st.floats(min_value=-10.0, max_value=600.0),
    st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0]),
)


@given(
    learnt=st.lists(st.tuples(st.sampled_from(["a", "b"]), any_seconds), max_size=700),
)
@settings(max_examples=60, deadline=None)
def test_learnt_latencies_are_always_those_of_the_samples_kept(
    learnt: list[tuple[str, float]],
) -> None:
    """However samples arrive (out of range, not finite, past what is kept), the plan's
    distribution of a workflow is the one of its latest SAMPLES_KEPT samples."""
    plan = PollPlan()
    for workflow, value in learnt:
        plan.learn(workflow, value)
    for workflow in ("a", "b"):
        recent = [value for w, value in learnt if w == workflow][-SAMPLES_KEPT:]
        assert plan.latencies(workflow) == Latencies.of(recent)


@given(values=st.lists(any_seconds, min_size=1, max_size=600))
@settings(max_examples=60, deadline=None)
def test_each_learnt_sample_leaves_the_distribution_of_the_samples_kept(
    values: list[float],
) -> None:
    plan = PollPlan()
    for count, value in enumerate(values, start=1):
        plan.learn("wf", value)
        assert plan.latencies("wf") == Latencies.of(values[max(0, count - SAMPLES_KEPT) : count])


@given(
    tick=st.floats(0.01, 60.0),
    initial=st.floats(0.01, 60.0),
    on_grid=st.booleans(),
    events_flowing=st.booleans(),
)
def test_while_events_flow_the_calls_announced_in_one_confirmation_window_go_together(
    tick: float, initial: float, on_grid: bool, events_flowing: bool
) -> None:
    grid = Grid(tick, 1) if on_grid else None
    quiet = ride_along_seconds(grid, initial=initial)
    ride = ride_along_seconds(grid, initial=initial, events_flowing=events_flowing)

    assert quiet == (initial if grid is None else tick * PRIORITY_SPREAD)
    if events_flowing:
        # an event's call is due a confirmation window after it: the window's events ride along
        assert ride == max(quiet, CONFIRM_WINDOW_SECONDS)
    else:
        assert ride == quiet
