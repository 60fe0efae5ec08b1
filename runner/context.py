"""What every stage of the pipeline shares: config, store, client, clock and wake-ups.

The wake-ups only say "look again"; every decision is read back from the store. State that one
stage keeps for itself (the watcher's cache of known files, say) belongs to that stage, and the
others tell it what they did.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from functools import cached_property

import anyio
import msgspec

from runner.api.client import BemClient
from runner.clock import Clock
from runner.config import Config
from runner.health import ApiHealth, StoreHealth
from runner.schedule import PollPlan
from runner.store.base import Store
from runner.webhook_policy import EventFlow

MIN_WAIT = 0.05
"""The shortest idle wait a stage asks for when it expects news soon: it never spins."""
MAX_IDLE_SECONDS = 3600.0
"""The longest idle wait: a stage looks again at least this often, whatever it was told."""


class Nudge:
    """A wake-up for one stage: every idle wait is "new work OR interval OR stop"."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._event = anyio.Event()
        self._wakes_at = math.inf
        """While the stage waits, the wall-clock time it looks again by itself; else infinity."""

    def set(self) -> None:
        self._event.set()

    def set_unless_due_later(self, due: float) -> None:
        """Work that is due at ``due`` (wall clock): wake the stage only if it would sleep past
        then. While the stage is awake it is woken regardless: it may have read the store
        before that work was written."""
        if due < self._wakes_at:
            self._event.set()

    async def wait(self, at_most: float) -> None:
        """Until :meth:`set` is called or ``at_most`` seconds of the clock's time have passed."""
        if not self._event.is_set() and at_most > 0:
            idle = min(at_most, MAX_IDLE_SECONDS) if math.isfinite(at_most) else MAX_IDLE_SECONDS
            self._wakes_at = self._clock.wall() + idle
            try:
                await self._clock.wait(self._event, idle)
            finally:
                self._wakes_at = math.inf
        self._event = anyio.Event()


class Nudges(msgspec.Struct):
    watch: Nudge
    group: Nudge
    submit: Nudge
    poll: Nudge
    deliver: Nudge
    supervisor: Nudge

    @classmethod
    def on(cls, clock: Clock) -> Nudges:
        """One wake-up per stage, each waiting on ``clock``."""
        return cls(*(Nudge(clock) for _ in range(6)))

    def all(self) -> tuple[Nudge, ...]:
        return (self.watch, self.group, self.submit, self.poll, self.deliver, self.supervisor)


class Context(msgspec.Struct, dict=True):
    config: Config
    store: Store
    client: BemClient
    clock: Clock
    draining: bool
    health: ApiHealth = msgspec.field(default_factory=ApiHealth)
    store_health: StoreHealth = msgspec.field(default_factory=StoreHealth)
    stopping: anyio.Event = msgspec.field(default_factory=anyio.Event)
    """Set on shutdown: take no new files, send nothing new, finish what is in flight."""
    inbox_taken: anyio.Event = msgspec.field(default_factory=anyio.Event)
    """Drain only: everything that was in the inbox has been taken."""
    rng: random.Random = msgspec.field(default_factory=random.Random)
    tally: Counter[str] = msgspec.field(default_factory=Counter)
    """Documents delivered by this process, by outcome ("result" / "error")."""
    on_call_finished: Callable[[float], None] | None = None
    """Told the submit-to-result seconds of every call that reaches its end (metrics)."""
    webhook_flow: EventFlow | None = None
    """What the webhook receiver hears, when there is one (:mod:`runner.webhook`)."""
    poll_plan: PollPlan = msgspec.field(default_factory=PollPlan)
    """What the poll schedule has learnt (:mod:`runner.schedule`)."""
    runner_id: str | None = None
    """This runner's id when it shares its store with other runners; None: it owns the store."""

    @cached_property
    def nudges(self) -> Nudges:
        """The stages' wake-ups, each waiting on :attr:`clock`."""
        return Nudges.on(self.clock)

    def stop(self) -> None:
        self.stopping.set()
        for nudge in self.nudges.all():
            nudge.set()
