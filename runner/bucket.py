"""The pure half of the rate limiter: the account's token bucket and what is learnt of its rate.

No clock and no waiting here: :mod:`runner.ratelimit` feeds these what it observes. See that
module's docstring for the policy (evidence, decrease, slow increase, one overrun one decision).
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import msgspec

MARGIN = 0.9
"""After a 429 the rate is set this fraction of the account's estimated rate: just below it."""

BLIND_DECREASE = 0.5
"""The rate is cut by this factor at a 429 when there is no evidence of the account's rate."""

PROBE_GROWTH = 0.1
"""While demand waits for tokens, the rate grows by this fraction every ``recovery_seconds``."""

MIN_EVIDENCE = 4
"""An estimate must rest on at least this many accepted requests beyond the bucket's content."""

MIN_EVIDENCE_SECONDS = 0.05
"""Shorter spans of observation give no estimate."""

MARKS = 8
"""How many past 429s, and past resumptions, serve as starting points of an estimate."""

_MAX_PROBE_STEP = 1.0  # seconds: a long quiet gap between successes is not a long probe


# -- learning the account's rate (pure) ----------------------------------------------------------


class Mark(msgspec.Struct, frozen=True):
    """A moment (``at``) when the account's bucket held at most ``tokens``, and how many
    requests granted from then on (grant number ``first_grant`` and later) it has accepted."""

    at: float
    first_grant: int
    tokens: float
    accepted: int = 0
    last_granted_at: float | None = None
    """When the latest of the accepted requests was granted: the span of the evidence ends
    there, not at the next 429, as answers to requests sent since may still be on their way."""

    def counted(self, grant: int, granted_at: float) -> Mark:
        """The account accepted the request with grant number ``grant``, granted then."""
        if grant < self.first_grant:
            return self
        latest = max(granted_at, self.last_granted_at or granted_at)
        # built directly: this runs for every mark at every answer
        return Mark(self.at, self.first_grant, self.tokens, self.accepted + 1, latest)

    @property
    def evidence(self) -> float:
        """Accepted requests beyond what the account's bucket may have held: what the bound
        rests on."""
        return self.accepted - self.tokens

    def lower_bound(self) -> float | None:
        """The least rate the account can have, given what it accepted since this mark."""
        if self.last_granted_at is None:
            return None
        span = self.last_granted_at - self.at
        if span < MIN_EVIDENCE_SECONDS:
            return None
        return self.evidence / span


class RateState(msgspec.Struct, frozen=True):
    """What the limiter has learnt about the account, and the rate it runs at because of it.

    Every method returns a new state; nothing here reads a clock or waits."""

    configured: float
    floor: float
    rate: float
    learnt: float | None = None
    """The account's rate as estimated at the last 429 with enough evidence."""
    overruns: tuple[Mark, ...] = ()
    """The last few 429s: the account's bucket was empty."""
    resumptions: tuple[Mark, ...] = ()
    """The last few times sending resumed after a silence: the account's bucket held at most
    a burst (assuming bem's burst is no larger than ours)."""
    probed_at: float | None = None

    @classmethod
    def initial(cls, *, configured: float, floor: float) -> RateState:
        return cls(configured=configured, floor=floor, rate=configured)

    def estimate(self) -> float | None:
        """The best lower bound of the account's rate among those that rest on enough
        evidence (``MIN_EVIDENCE``); a bound on less is mostly noise."""
        bounds = [
            bound
            for mark in (*self.overruns, *self.resumptions)
            if mark.evidence >= MIN_EVIDENCE and (bound := mark.lower_bound()) is not None
        ]
        return max(bounds, default=None)

    def after_overrun(self, now: float, *, next_grant: int) -> RateState:
        """A 429 to a request granted since the last one: settle just below the account's rate,
        or halve the rate while there is too little evidence of it."""
        estimate = self.estimate()
        learnt = self.learnt
        if estimate is not None:
            learnt = min(estimate, self.rate)
            rate = MARGIN * learnt
        else:
            rate = self.rate * BLIND_DECREASE
        mark = Mark(now, next_grant, tokens=1.0)
        return msgspec.structs.replace(
            self,
            rate=max(self.floor, rate),
            learnt=learnt,
            overruns=(*self.overruns, mark)[-MARKS:],
            probed_at=None,
        )

    def after_resumption(self, now: float, *, grant: int, burst: int) -> RateState:
        """Granted ``grant`` after a silence (our bucket full, or a pause over)."""
        mark = Mark(now, grant, tokens=float(burst))
        return msgspec.structs.replace(self, resumptions=(*self.resumptions, mark)[-MARKS:])

    def after_answer(self, grant: int, *, granted_at: float) -> RateState:
        """bem took the request with grant number ``grant`` (answered anything but 429)."""
        return msgspec.structs.replace(
            self,
            overruns=tuple(mark.counted(grant, granted_at) for mark in self.overruns),
            resumptions=tuple(mark.counted(grant, granted_at) for mark in self.resumptions),
        )

    def after_success(self, now: float, *, saturated: bool, growth_per_second: float) -> RateState:
        """A success; ``saturated``: requests are waiting for tokens, so a higher rate would be
        used. Grows the rate slowly, counting only time spent saturated."""
        if self.probed_at is None or not saturated or now <= self.probed_at:
            return msgspec.structs.replace(self, probed_at=max(now, self.probed_at or now))
        step = min(now - self.probed_at, _MAX_PROBE_STEP)
        rate = min(self.configured, self.rate * (1 + growth_per_second * step))
        return msgspec.structs.replace(self, rate=max(self.rate, rate), probed_at=now)

    def reconfigured(self, *, configured: float, floor: float) -> RateState:
        """New configured limits. What was learnt about the account still holds: a rate that
        was lowered because of it stays as low (unless the new configuration is lower still)."""
        lowered = self.rate < self.configured
        rate = min(configured, max(floor, self.rate)) if lowered else configured
        return msgspec.structs.replace(self, configured=configured, floor=floor, rate=rate)


# -- the bucket ----------------------------------------------------------------------------------


class TokenBucket:
    """A token bucket (``burst`` capacity, refilled at ``rate`` per second), full when first used.

    Kept in exact arithmetic, so it never holds a token that the ideal bucket would not hold,
    however long it runs. A server-side bucket built from this class with the same limits and
    read with the same clock never refuses a request the limiter let through. It can be in debt
    (fewer than no tokens): tokens owed for requests already sent.

    Exact without :class:`~fractions.Fraction`: every input is a float or an int, and every float
    is a dyadic rational (an integer over a power of two), as are the sums, differences, products,
    minima and maxima of such numbers, which are all a refill needs. So the state is plain ints
    in binary fixed point: clock readings and the rate in units of ``2**-bits``, tokens in units
    of ``2**-(2 * bits)`` (elapsed time times rate lands there exactly). An input with more
    fractional bits than that makes ``bits`` grow and what is held is shifted to the finer
    units; ``bits`` never shrinks, so nothing is ever rounded. This does the same as rationals
    without a gcd per operation, which made the bucket a noticeable share of the runner's CPU.
    Only :meth:`wait_time` divides (by the rate), once per wait.
    """

    def __init__(self, *, rate: float, burst: int) -> None:
        rate_numerator, bits = _dyadic(rate)
        self._bits = bits  # fractional bits of clock readings and the rate: only ever grows
        self._rate = rate_numerator  # in time units (2**-bits) of tokens per second
        self._one = 1 << 2 * bits  # one token, in token units (2**-(2 * bits))
        self._burst = operator.index(burst) * self._one
        self._tokens = self._burst
        self._stamp: int | None = None  # the latest clock reading refilled to, in time units
        self._seen: float | None = None  # the clock reading last refilled to

    def holds(self, now: float, tokens: int) -> bool:
        """At least ``tokens`` whole tokens are there."""
        self._advance(now)
        return self._tokens >= tokens * self._one

    def try_take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._advance(now)
        if self._tokens < self._one:
            return False
        self._tokens -= self._one
        return True

    def is_full(self, now: float) -> bool:
        self._advance(now)
        return self._tokens >= self._burst

    def give_back(self) -> None:
        """Return a token that was taken but not used."""
        self._tokens = min(self._burst, self._tokens + self._one)

    def debt(self, now: float) -> Fraction:
        """How many tokens are owed (0 unless the bucket is in debt), exactly."""
        self._advance(now)
        return Fraction(max(0, -self._tokens), self._one)

    def empty(self, now: float, *, until: float | None = None, owing: Fraction | int = 0) -> None:
        """No token now (``owing`` tokens owed: a whole or dyadic number, such as a
        :meth:`debt` less some tokens), and none accrues before ``until`` (the end of a 429
        pause)."""
        self._advance(now)
        self._tokens = -self._token_units(max(0, owing))
        if until is not None and self._stamp is not None:
            end = self._units(until)  # first: it may refine the units the stamp is in
            self._stamp = max(self._stamp, end)

    def wait_time(self, now: float, tokens: int = 1) -> float:
        """Seconds until ``tokens`` whole tokens are there (0 if they are), such that the float
        ``now + d`` is not before the exact moment the last of them arrives (and, for a clock
        reading >= 0, at most one float step after it)."""
        self._advance(now)
        if self._tokens >= tokens * self._one:
            return 0.0
        start = self._units(now)  # first: it may refine the units of what is held
        if self._stamp is not None:
            start = max(start, self._stamp)
        missing = tokens * self._one - self._tokens
        # due = start + missing / rate, in seconds: (start * 2**-bits) + (missing *
        # 2**-(2 * bits)) / (rate * 2**-bits), over the common denominator rate * 2**bits
        numerator = start * self._rate + missing
        denominator = self._rate << self._bits
        return _delay_to(now, _float_at_or_after(numerator, denominator))

    def set_rate(self, now: float, rate: float) -> None:
        self._advance(now)
        self._rate = self._units(rate)

    def set_burst(self, now: float, burst: int) -> None:
        self._advance(now)
        self._burst = operator.index(burst) * self._one
        self._tokens = min(self._tokens, self._burst)

    def _advance(self, now: float) -> None:
        # Refilling twice to one reading adds nothing the second time: skip the arithmetic.
        if now == self._seen:
            return
        self._seen = now
        reading = self._units(now)
        if self._stamp is None or reading > self._stamp:
            # a clock reading before the stamp (a clock that went back) refills nothing
            if self._stamp is not None:
                refill = (reading - self._stamp) * self._rate
                self._tokens = min(self._burst, self._tokens + refill)
            self._stamp = reading

    def _units(self, value: float) -> int:
        """A clock reading or rate in time units, made finer first if ``value`` needs it.

        Call it before reading any other value held in units: those may change."""
        numerator, bits = _dyadic(value)
        if bits > self._bits:
            self._refine(bits)
        return numerator << (self._bits - bits)

    def _token_units(self, count: Fraction | int) -> int:
        """A count of tokens in token units, made finer first if ``count`` needs it."""
        numerator, bits = _dyadic(count)
        if bits > 2 * self._bits:
            self._refine((bits + 1) // 2)
        return numerator << (2 * self._bits - bits)

    def _refine(self, bits: int) -> None:
        """Finer units: ``bits`` fractional bits for times and the rate, twice that for tokens."""
        shift = bits - self._bits
        self._bits = bits
        self._rate <<= shift
        if self._stamp is not None:
            self._stamp <<= shift
        self._one <<= 2 * shift
        self._burst <<= 2 * shift
        self._tokens <<= 2 * shift


def _dyadic(value: float | Fraction) -> tuple[int, int]:
    """``value`` as ``numerator / 2**bits``, exactly: (numerator, bits). Any float or int is."""
    numerator, denominator = value.as_integer_ratio()
    bits = denominator.bit_length() - 1
    if denominator != 1 << bits:
        raise ValueError(f"{value!r} is not an integer over a power of two")
    return numerator, bits


def float_delay(now: float, due: Fraction | float) -> float:
    """A delay after which the float ``now + delay`` is not before ``due``, and barely so."""
    numerator, denominator = due.as_integer_ratio()
    return _delay_to(now, _float_at_or_after(numerator, denominator))


def _float_at_or_after(numerator: int, denominator: int) -> float:
    """The least float not below ``numerator / denominator`` (``denominator`` > 0)."""
    target = numerator / denominator  # int true division rounds correctly: the nearest float
    low, high = target.as_integer_ratio()
    if low * denominator < numerator * high:  # it was rounded down: the next float is above
        target = math.nextafter(target, math.inf)
    return target


def _delay_to(now: float, target: float) -> float:
    """A delay after which the float ``now + delay`` is not before ``target``, and barely so."""
    delay = target - now  # exact whenever target and now are close (Sterbenz)
    while now + delay < target:  # otherwise a step or two of rounding to make up
        delay = math.nextafter(delay, math.inf)
    return delay
