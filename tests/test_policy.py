from __future__ import annotations

import math
import random
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.policy import parse_duration, poll_delay, retry_delay, unknown_outcome_resolution


class FixedRandom(random.Random):
    """A random source that always draws the same number in [0, 1)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


ALMOST_ONE = math.nextafter(1.0, 0.0)

attempts = st.integers(min_value=0, max_value=3000)
seeds = st.integers(min_value=0, max_value=2**32)
positive = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)
draws = st.floats(min_value=0.0, max_value=ALMOST_ONE)


# -- poll_delay -------------------------------------------------------------------------------


@given(attempt=attempts, initial=positive, factor=st.floats(1.0, 1e4), seed=seeds)
def test_poll_delay_stays_between_half_initial_and_maximum(
    attempt: int, initial: float, factor: float, seed: int
) -> None:
    maximum = initial * factor
    delay = poll_delay(attempt, initial=initial, maximum=maximum, rng=random.Random(seed))
    assert initial / 2 <= delay <= maximum


@given(attempt=attempts, initial=positive, factor=st.floats(1.0, 1e4), draw=draws)
def test_poll_delay_is_equal_jitter_of_the_capped_exponential(
    attempt: int, initial: float, factor: float, draw: float
) -> None:
    maximum = initial * factor
    step = min(maximum, initial * 2.0 ** min(attempt, 1023))
    delay = poll_delay(attempt, initial=initial, maximum=maximum, rng=FixedRandom(draw))
    assert step / 2 <= delay <= step
    assert delay == pytest.approx(step / 2 + step / 2 * draw, rel=1e-12)


def test_poll_delay_doubles_from_initial_up_to_maximum() -> None:
    fixed = [
        poll_delay(attempt, initial=1.0, maximum=30.0, rng=FixedRandom(0.0)) for attempt in range(8)
    ]
    assert fixed == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    top = [
        poll_delay(attempt, initial=1.0, maximum=30.0, rng=FixedRandom(ALMOST_ONE))
        for attempt in range(8)
    ]
    assert top == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])


def test_poll_delay_handles_huge_attempts() -> None:
    assert poll_delay(10**9, initial=2.0, maximum=60.0, rng=FixedRandom(0.0)) == 30.0


def test_poll_delay_spreads_polls_out() -> None:
    rng = random.Random(7)
    delays = {poll_delay(3, initial=1.0, maximum=30.0, rng=rng) for _ in range(100)}
    assert len(delays) == 100
    assert min(delays) >= 4.0
    assert max(delays) <= 8.0


@pytest.mark.parametrize(
    ("attempt", "initial", "maximum", "message"),
    [
        (-1, 1.0, 30.0, "attempt"),
        (True, 1.0, 30.0, "attempt"),
        (0, 0.0, 30.0, "initial"),
        (0, -1.0, 30.0, "initial"),
        (0, float("nan"), 30.0, "initial"),
        (0, 5.0, 4.0, "at least initial"),
        (0, 1.0, float("inf"), "maximum"),
    ],
)
def test_poll_delay_rejects_bad_arguments(
    attempt: int, initial: float, maximum: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        poll_delay(attempt, initial=initial, maximum=maximum, rng=random.Random(0))


# -- retry_delay ------------------------------------------------------------------------------


@given(attempt=attempts, base=positive, factor=st.floats(1.0, 1e4), seed=seeds)
def test_retry_delay_is_full_jitter_under_the_capped_exponential(
    attempt: int, base: float, factor: float, seed: int
) -> None:
    maximum = base * factor
    delay = retry_delay(attempt, base=base, maximum=maximum, rng=random.Random(seed))
    assert 0.0 <= delay <= min(maximum, base * 2.0 ** min(attempt, 1023))


@given(
    attempt=attempts,
    seed=seeds,
    retry_after=st.floats(min_value=-10.0, max_value=1e6, allow_nan=False),
)
def test_retry_delay_never_comes_before_retry_after(
    attempt: int, seed: int, retry_after: float
) -> None:
    jitter_only = retry_delay(attempt, rng=random.Random(seed))
    delay = retry_delay(attempt, rng=random.Random(seed), retry_after=retry_after)
    assert delay == max(retry_after, jitter_only)
    assert delay >= retry_after
    assert delay >= 0.0


def test_retry_delay_defaults() -> None:
    top = [retry_delay(attempt, rng=FixedRandom(ALMOST_ONE)) for attempt in range(8)]
    assert top == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
    assert retry_delay(5, rng=FixedRandom(0.0)) == 0.0
    assert retry_delay(0, rng=FixedRandom(0.5), retry_after=3600.0) == 3600.0
    assert retry_delay(10**6, rng=FixedRandom(0.5)) == 15.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempt": -1}, "attempt"),
        ({"attempt": 0, "base": 0.0}, "base"),
        ({"attempt": 0, "base": 2.0, "maximum": 1.0}, "at least base"),
        ({"attempt": 0, "retry_after": float("nan")}, "Retry-After"),
        ({"attempt": 0, "retry_after": float("inf")}, "Retry-After"),
    ],
)
def test_retry_delay_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retry_delay(rng=random.Random(0), **kwargs)  # type: ignore[arg-type]


# -- parse_duration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400.0),
        ("90m", 5400.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("1.5d", 129600.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
        ("45", 45.0),
        ("0.25", 0.25),
        (" 10 ", 10.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1d2h3m4s5ms", 93784.005),
        ("1h 30m", 5400.0),
        ("2H", 7200.0),
        (".5h", 1800.0),
        ("3.m", 180.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("abc", "invalid duration 'abc'"),
        ("5x", "unknown unit 'x'"),
        ("5 hours", "unknown unit 'hours'"),
        ("1m1h", "largest first"),
        ("1h1h", "largest first"),
        ("h", "invalid duration"),
        ("1h30", "invalid duration"),
        ("-5", "cannot be negative"),
        ("-1h", "cannot be negative"),
        ("1e3", "invalid duration"),
        ("1,5h", "invalid duration"),
        (-1, "negative"),
        (-0.5, "negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (True, "number of seconds or a string"),
        (None, "number of seconds or a string"),
    ],
)
def test_parse_duration_rejects_with_a_clear_message(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)  # type: ignore[arg-type]


@given(
    days=st.integers(0, 400),
    hours=st.integers(0, 100),
    minutes=st.integers(0, 1000),
    seconds=st.integers(0, 10**5),
)
def test_parse_duration_adds_up_its_parts(
    days: int, hours: int, minutes: int, seconds: int
) -> None:
    text = f"{days}d{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == days * 86400 + hours * 3600 + minutes * 60 + seconds


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_parse_duration_takes_numbers_as_seconds(seconds: float) -> None:
    exact = format(Decimal(seconds), "f")  # positional notation, no exponent
    assert parse_duration(seconds) == seconds
    assert parse_duration(exact) == seconds
    assert parse_duration(f"{exact}s") == seconds


@given(st.text(max_size=12))
def test_parse_duration_returns_a_non_negative_number_or_raises_value_error(text: str) -> None:
    seconds: float | None = None
    problem = ""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        problem = str(exc)
    if seconds is None:
        assert "duration" in problem
    else:
        assert seconds >= 0
        assert math.isfinite(seconds)


# -- unknown_outcome_resolution ---------------------------------------------------------------


def test_unknown_outcome_examples() -> None:
    common = {"sent_at": 100.0, "visibility_window": 30.0}
    assert unknown_outcome_resolution(now=101.0, found=True, **common) == "adopt"
    assert unknown_outcome_resolution(now=500.0, found=True, **common) == "adopt"
    assert unknown_outcome_resolution(now=101.0, found=False, **common) == "wait"
    assert unknown_outcome_resolution(now=129.999, found=False, **common) == "wait"
    assert unknown_outcome_resolution(now=130.0, found=False, **common) == "resend"
    assert unknown_outcome_resolution(now=1e6, found=False, **common) == "resend"
    # a clock that went backwards proves nothing about visibility
    assert unknown_outcome_resolution(now=50.0, found=False, **common) == "wait"


@given(
    now=st.floats(-1e9, 1e9),
    sent_at=st.floats(-1e9, 1e9),
    window=st.floats(0, 1e6),
    found=st.booleans(),
)
def test_unknown_outcome_is_adopt_wait_or_resend_by_the_rules(
    now: float, sent_at: float, window: float, found: bool
) -> None:
    decision = unknown_outcome_resolution(
        now=now, sent_at=sent_at, visibility_window=window, found=found
    )
    if found:
        assert decision == "adopt"
    elif now - sent_at < window:
        assert decision == "wait"
    else:
        assert decision == "resend"


def test_a_zero_window_resends_at_once() -> None:
    decision = unknown_outcome_resolution(now=5.0, sent_at=5.0, visibility_window=0.0, found=False)
    assert decision == "resend"
