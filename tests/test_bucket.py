"""The token bucket in integer (dyadic) arithmetic against the same bucket in rationals.

:class:`FractionBucket` is the bucket as it was first written, in :class:`~fractions.Fraction`
arithmetic: obviously exact, and too slow for the runner's every request. Whatever is done to
both, :class:`runner.bucket.TokenBucket` must answer exactly as it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.bucket import TokenBucket, float_delay

# -- the oracle: the bucket in rational arithmetic -------------------------------------------


class FractionBucket:
    """A token bucket (``burst`` capacity, refilled at ``rate`` per second), full when first used,
    in exact rational arithmetic."""

    def __init__(self, *, rate: float, burst: int) -> None:
        self._rate = Fraction(rate)
        self._burst = Fraction(burst)
        self._tokens = Fraction(burst)
        self._stamp: Fraction | None = None
        self._seen: float | None = None  # the clock reading last refilled to

    def holds(self, now: float, tokens: int) -> bool:
        self._advance(now)
        return self._tokens >= tokens

    def try_take(self, now: float) -> bool:
        self._advance(now)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def is_full(self, now: float) -> bool:
        self._advance(now)
        return self._tokens >= self._burst

    def give_back(self) -> None:
        self._tokens = min(self._burst, self._tokens + 1)

    def debt(self, now: float) -> Fraction:
        self._advance(now)
        return max(Fraction(0), -self._tokens)

    def empty(self, now: float, *, until: float | None = None, owing: Fraction | int = 0) -> None:
        self._advance(now)
        self._tokens = -Fraction(max(0, owing))
        if until is not None and self._stamp is not None and Fraction(until) > self._stamp:
            self._stamp = Fraction(until)

    def wait_time(self, now: float, tokens: int = 1) -> float:
        self._advance(now)
        if self._tokens >= tokens:
            return 0.0
        exact_now = Fraction(now)
        start = max(exact_now, self._stamp) if self._stamp is not None else exact_now
        return fraction_float_delay(now, start + (tokens - self._tokens) / self._rate)

    def set_rate(self, now: float, rate: float) -> None:
        self._advance(now)
        self._rate = Fraction(rate)

    def set_burst(self, now: float, burst: int) -> None:
        self._advance(now)
        self._burst = Fraction(burst)
        self._tokens = min(self._tokens, self._burst)

    def _advance(self, now: float) -> None:
        if now != self._seen:
            self._seen = now
            self._refill(Fraction(now))

    def _refill(self, now: Fraction) -> None:
        if self._stamp is not None and now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        if self._stamp is None or now > self._stamp:
            self._stamp = now


def fraction_float_delay(now: float, due: Fraction) -> float:
    target = float(due)
    if Fraction(target) < due:
        target = math.nextafter(target, math.inf)
    delay = target - now
    while now + delay < target:
        delay = math.nextafter(delay, math.inf)
    return delay


def tokens_held(bucket: TokenBucket) -> Fraction:
    """The exact content of ``bucket`` (its private state: a divergence shows at once)."""
    return Fraction(bucket._tokens, bucket._one)


# -- random operations -----------------------------------------------------------------------

AWKWARD_RATES = [0.1, 1 / 3, 1e-6, 1e6, 2.0, 10.0, 50.0, 0.9 * 0.1, 0.9 * (1 / 3), 0.9 * 7.3]

rates = st.one_of(
    st.sampled_from(AWKWARD_RATES),
    st.floats(min_value=1e-6, max_value=1e6),
    st.floats(min_value=0.01, max_value=10.0),  # slow enough for a debt to last a while
    st.floats(min_value=1e-3, max_value=1e3).map(lambda rate: 0.9 * rate),
    st.floats(min_value=1e-3, max_value=1e3).map(lambda rate: rate * 0.5 * 1.1),
)

starts = st.one_of(
    st.sampled_from([0.0, 1e-3, 1.0, 1000.0, 12345.678, 1e6 + 0.1, 3e9 + 1 / 3]),
    st.floats(min_value=0.0, max_value=1e9),
)

steps = st.one_of(
    st.floats(min_value=0.0, max_value=3.0),  # the clock moves on (a little)
    st.sampled_from([0.0, 0.0, 0.1, 1 / 3, 1e-9, 5e-324, 100.0]),  # repeated, awkward, large
    st.floats(min_value=-2.0, max_value=0.0),  # a clock that went back
)
short_steps = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=0.1), steps)


@dataclass(frozen=True)
class Op:
    name: str
    step: float = 0.0
    count: int = 1
    rate: float = 1.0
    until: float | None = None
    owing: int | None = None  # None: the debt, less ``count`` (0 or 1), as the limiter does


operations = st.one_of(
    st.builds(Op, st.just("holds"), steps, st.integers(1, 25)),
    st.builds(Op, st.just("try_take"), steps),
    st.builds(Op, st.just("try_take"), steps),
    st.builds(Op, st.just("is_full"), steps),
    st.builds(Op, st.just("give_back")),
    st.builds(Op, st.just("debt"), short_steps),
    st.builds(
        Op,
        st.just("empty"),
        short_steps,
        st.integers(0, 1),
        until=st.one_of(
            st.none(), st.floats(-3.0, 10.0), st.sampled_from([0.1, 1 / 3, -1 / 3, 1e-9])
        ),
        owing=st.one_of(st.none(), st.integers(-1, 5)),
    ),
    st.builds(Op, st.just("wait_time"), steps, st.integers(1, 25)),
    st.builds(Op, st.just("wait_time"), steps, st.integers(1, 25)),
    st.builds(Op, st.just("due"), count=st.integers(1, 25)),  # to the moment last waited for
    st.builds(Op, st.just("set_rate"), steps, rate=rates),
    st.builds(Op, st.just("set_burst"), steps, st.integers(1, 20)),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=rates,
    burst=st.integers(1, 20),
    start=starts,
    ops=st.lists(operations, min_size=1, max_size=60),
)
def test_the_integer_bucket_answers_as_the_rational_one(
    rate: float, burst: int, start: float, ops: list[Op]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    oracle = FractionBucket(rate=rate, burst=burst)
    now = start
    due = start
    for op in ops:
        if op.name == "due":
            now = due  # exactly when the tokens last waited for are there
        else:
            now += op.step
        # a wait for no more tokens than the burst, as the limiter asks (more never come)
        tokens = min(op.count, int(oracle._burst))
        match op.name:
            case "holds" | "due":
                assert bucket.holds(now, op.count) == oracle.holds(now, op.count)
            case "try_take":
                assert bucket.try_take(now) == oracle.try_take(now)
            case "is_full":
                assert bucket.is_full(now) == oracle.is_full(now)
            case "give_back":
                bucket.give_back()
                oracle.give_back()
            case "debt":
                debt = bucket.debt(now)
                assert debt == oracle.debt(now)
                assert isinstance(debt, Fraction)
            case "empty":
                until = None if op.until is None else now + op.until
                owing: Fraction | int
                if op.owing is None:  # as at a 429 of the same overrun: what is owed, less a refund
                    debt = bucket.debt(now)
                    assert debt == oracle.debt(now)
                    owing = debt - op.count
                else:
                    owing = op.owing
                bucket.empty(now, until=until, owing=owing)
                oracle.empty(now, until=until, owing=owing)
            case "wait_time":
                delay = bucket.wait_time(now, tokens)
                assert delay == oracle.wait_time(now, tokens)
                due = now + delay
            case "set_rate":
                bucket.set_rate(now, op.rate)
                oracle.set_rate(now, op.rate)
            case "set_burst":
                bucket.set_burst(now, op.count)
                oracle.set_burst(now, op.count)
        assert tokens_held(bucket) == oracle._tokens


@given(
    now=st.one_of(st.floats(min_value=0.0, max_value=1e12), st.floats(-1e6, 1e6)),
    numerator=st.integers(-(10**20), 10**20),
    denominator=st.integers(1, 10**12),
    offset=st.floats(min_value=0.0, max_value=1e3),
)
def test_float_delay_is_as_with_rationals(
    now: float, numerator: int, denominator: int, offset: float
) -> None:
    due = Fraction(numerator, denominator) / 10**6 + Fraction(now)
    assert float_delay(now, due) == fraction_float_delay(now, due)
    assert float_delay(now, now + offset) == fraction_float_delay(now, Fraction(now + offset))
    target = now + float_delay(now, due)
    assert Fraction(target) >= due
    if now >= 0:  # and barely after it
        earlier = math.nextafter(math.nextafter(target, -math.inf), -math.inf)
        assert Fraction(earlier) < due


# -- cases worth naming ----------------------------------------------------------------------


def test_the_finest_clock_readings_and_rates_stay_exact() -> None:
    """Readings and rates with every fractional bit a float can have (subnormals) are held
    exactly: the units get finer, what the bucket holds does not change."""
    bucket = TokenBucket(rate=1e6, burst=3)
    oracle = FractionBucket(rate=1e6, burst=3)
    for now in (5e-324, 1e-310, 0.1, 1 / 3, 0.5):
        assert bucket.try_take(now) == oracle.try_take(now)
        assert tokens_held(bucket) == oracle._tokens
    bucket.set_rate(1.0, 5e-324)
    oracle.set_rate(1.0, 5e-324)
    for now in (1.0, 2.0, 1e300):
        assert bucket.holds(now, 3) == oracle.holds(now, 3)
        assert bucket.debt(now) == oracle.debt(now)
        assert tokens_held(bucket) == oracle._tokens


def test_a_pause_that_ends_before_the_stamp_in_finer_units_moves_nothing() -> None:
    """The end of a pause with more fractional bits than any reading so far refines the units
    (the stamp among what is shifted) before it is compared with the stamp."""
    bucket = TokenBucket(rate=0.1, burst=1)
    oracle = FractionBucket(rate=0.1, burst=1)
    for each in (bucket, oracle):
        assert each.holds(1.0, 1)
        each.empty(0.0, until=0.001)  # a clock that went back, and a pause over before 1.0
    assert tokens_held(bucket) == oracle._tokens == 0
    assert bucket.wait_time(1.0) == oracle.wait_time(1.0) == 10.0


def test_a_debt_less_a_refund_is_owed_exactly() -> None:
    bucket = TokenBucket(rate=0.1, burst=2)
    bucket.empty(100.0, owing=3)
    debt = bucket.debt(101.0)  # 3 less a tenth of a token (0.1 as a float, exactly)
    assert debt == 3 - Fraction(0.1)
    bucket.empty(101.0, until=200.0, owing=debt - 1)
    assert bucket.debt(150.0) == 2 - Fraction(0.1)  # nothing accrues before `until`
    due = 200 + (3 - Fraction(0.1)) / Fraction(0.1)
    assert bucket.wait_time(150.0) == fraction_float_delay(150.0, due)


def test_debts_to_the_last_bit() -> None:
    # the finest bit of a reading times the finest bit of the rate: the finest bit of a token
    bucket = TokenBucket(rate=0.1, burst=1)
    bucket.empty(0.0, owing=1)
    assert bucket.debt(2.0**-55) == 1 - Fraction(0.1) * Fraction(2.0**-55)
    # owed more finely than anything seen so far (an odd number of bits, too)
    for bits in (1, 101, 2001):
        owing = Fraction(5, 2**bits)
        bucket = TokenBucket(rate=3.0, burst=2)
        oracle = FractionBucket(rate=3.0, burst=2)
        for each in (bucket, oracle):
            each.empty(7.0, owing=owing)
        assert bucket.debt(7.0) == owing
        assert bucket.wait_time(7.0, 2) == oracle.wait_time(7.0, 2)
        assert bucket.debt(7.5) == oracle.debt(7.5)


def test_what_is_not_dyadic_is_refused_not_rounded() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    with pytest.raises(ValueError, match="power of two"):
        bucket.empty(0.0, owing=Fraction(1, 3))
    with pytest.raises(TypeError):
        bucket.set_burst(0.0, 1.5)  # type: ignore[arg-type]
