"""The runner's life: ``startup`` / ``main_loop`` / ``shutdown``.

``run`` and ``drain`` are the same loop; a drain is told to exit once everything that was in
the inbox has been taken, sent, followed and delivered. Signal handlers only set flags: the
first SIGTERM/SIGINT stops intake and lets in-flight requests finish (bounded by the graceful
timeout), a second SIGINT cancels at once — which still loses nothing, because the store is
the queue.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum

import anyio
import httpx
import structlog

from runner.api.client import BemClient
from runner.clock import Clock, SystemClock
from runner.config import Config
from runner.context import Context
from runner.deliver import Deliverer
from runner.errors import ConfigError
from runner.group import Grouper
from runner.poll import Poller
from runner.ratelimit import RateLimiter
from runner.store.base import Counts
from runner.store.sqlite import open_sqlite_store
from runner.submit import Submitter
from runner.watch import EventSource, Intake, watchfiles_events

log = structlog.get_logger("runner.daemon")

RATE_HEADROOM = 0.97
"""Run a little under the account's limit and keep one token of bem's bucket unspent: the margin
absorbs network jitter, where running exactly at the limit turns every early arrival into a 429."""


class ExitCode(IntEnum):
    OK = 0
    FILE_ERRORS = 1
    USAGE = 2
    API_UNAVAILABLE = 3


@dataclass
class Outcome:
    exit_code: ExitCode
    counts: Counts
    delivered: dict[str, int]
    """Documents this run wrote, by outcome."""
    reason: str | None = None


Progress = Callable[[Counts], Awaitable[None]]


@dataclass
class RunnerOptions:
    drain: bool = False
    graceful_timeout: float = 30.0
    handle_signals: bool = True
    supervise_every: float = 1.0


class Runner:
    def __init__(
        self,
        config: Config,
        options: RunnerOptions,
        *,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        events: EventSource | None = watchfiles_events,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.options = options
        self.clock = clock or SystemClock()
        self.transport = transport
        self.events = events
        self.progress = progress
        self.should_exit = False
        self.force_exit = False
        self._exit_code = ExitCode.OK
        self._reason: str | None = None

    async def serve(self) -> Outcome:
        config = self.config
        if config.api_key is None:
            raise ConfigError("no API key: set BEM_API_KEY, api.api_key_file, or use --emulator")
        limiter = RateLimiter(
            rate=config.limits.requests_per_second * RATE_HEADROOM,
            burst=max(1, config.limits.burst - 1),
            max_concurrency=config.limits.max_concurrency,
            clock=self.clock,
        )
        async with (
            open_sqlite_store(config.paths.state) as store,
            BemClient(
                base_url=config.api.base_url,
                api_key=config.api_key.get_secret_value(),
                limiter=limiter,
                transport=self.transport,
                timeout=config.api.timeout_seconds,
                clock=self.clock,
            ) as client,
        ):
            ctx = Context(
                config=config,
                store=store,
                client=client,
                clock=self.clock,
                draining=self.options.drain,
                rng=random.Random(),
            )
            await self.startup(ctx)
            await self.main_loop(ctx)
            return await self.shutdown(ctx)

    async def startup(self, ctx: Context) -> None:
        for path in (ctx.config.paths.inbox, ctx.config.paths.outbox):
            path.mkdir(parents=True, exist_ok=True)
        await ctx.store.recover()
        counts = await ctx.store.counts()
        log.info(
            "runner started",
            mode="drain" if self.options.drain else "run",
            inbox=str(ctx.config.paths.inbox),
            outbox=str(ctx.config.paths.outbox),
            open_calls=counts.open_calls,
            api=ctx.config.api.base_url,
            version=ctx.config.api.version,
        )

    async def main_loop(self, ctx: Context) -> None:
        intake = Intake(ctx, events=self.events)
        stages: dict[str, Callable[[], Awaitable[None]]] = {
            "intake": intake.run,
            "group": Grouper(ctx, unsettled_under=intake.has_pending_under).run,
            "submit": Submitter(ctx).run,
            "poll": Poller(ctx).run,
            "deliver": Deliverer(ctx).run,
        }
        running = set(stages)
        all_stopped = anyio.Event()

        async def run_stage(name: str) -> None:
            try:
                await stages[name]()
            finally:
                running.discard(name)
                if not running:
                    all_stopped.set()

        async with anyio.create_task_group() as tg:
            for name in stages:
                tg.start_soon(run_stage, name, name=f"stage-{name}")
            if self.options.handle_signals:
                tg.start_soon(self._watch_signals, ctx, name="signals")
            await self._supervise(ctx)
            log.info("stopping: intake stopped, finishing in-flight requests")
            ctx.stop()
            with anyio.move_on_after(self.options.graceful_timeout):
                while not all_stopped.is_set() and not self.force_exit:
                    with anyio.move_on_after(0.2):
                        await all_stopped.wait()
            tg.cancel_scope.cancel()

    async def _supervise(self, ctx: Context) -> None:
        """Wake on news or every few seconds; decide whether the runner should stop."""
        while not self.should_exit:
            counts = await ctx.store.counts()
            if self.progress is not None:
                await self.progress(counts)
            if self.options.drain:
                await self._check_drain(ctx)
            if self.should_exit:
                return
            await ctx.nudges.supervisor.wait(self.options.supervise_every)

    async def _check_drain(self, ctx: Context) -> None:
        health = ctx.health
        if health.auth_error is not None:
            self._stop(ExitCode.API_UNAVAILABLE, f"bem rejected the API key: {health.auth_error}")
        elif (
            health.unreachable_since is not None
            and ctx.clock.wall() - health.unreachable_since >= ctx.config.api.unreachable_timeout
        ):
            self._stop(ExitCode.API_UNAVAILABLE, f"bem cannot be reached: {health.last_error}")
        elif ctx.intake_done.is_set() and await ctx.store.unfinished_work() == 0:
            self.should_exit = True

    def _stop(self, code: ExitCode, reason: str) -> None:
        self._exit_code = code
        self._reason = reason
        self.should_exit = True
        log.error("stopping", reason=reason)

    async def _watch_signals(self, ctx: Context) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.should_exit and signum == signal.SIGINT:
                    self.force_exit = True
                    log.warning("second interrupt: exiting now")
                else:
                    log.info("signal received; shutting down", signal=signal.Signals(signum).name)
                    self.should_exit = True
                ctx.stop()

    async def shutdown(self, ctx: Context) -> Outcome:
        with anyio.CancelScope(shield=True):
            counts = await ctx.store.counts()
        code = self._exit_code
        if code == ExitCode.OK and self.options.drain and ctx.tally["error"]:
            code = ExitCode.FILE_ERRORS
        log.info(
            "runner stopped",
            exit_code=int(code),
            results=ctx.tally["result"],
            errors=ctx.tally["error"],
            open_calls=counts.open_calls,
        )
        return Outcome(code, counts, dict(ctx.tally), self._reason)
