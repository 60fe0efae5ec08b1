"""The runner's life: ``startup`` / ``main_loop`` / ``shutdown``.

``run`` and ``drain`` are the same loop; a drain is told to exit once everything that was in
the inbox has been taken, sent, followed and delivered. Signal handlers only set flags: the
first SIGTERM/SIGINT stops intake and lets in-flight requests finish (bounded by the graceful
timeout), a second SIGINT cancels at once — which still loses nothing, because the store is
the queue. SIGHUP re-reads the configuration and applies new limits and routes in place.

Under systemd the supervisor's loop reports to the service manager (:mod:`runner.notify`):
``READY=1`` once the store is recovered, ``STATUS=`` with live counts, and a watchdog ping per
turn of the loop — a loop that stops turning stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import anyio
import httpx
import msgspec
import structlog

from runner.api.client import BemClient
from runner.clock import Clock, SystemClock
from runner.config import Config
from runner.context import Context
from runner.deliver import Deliverer
from runner.errors import ConfigError, RunnerError, StoreUnavailableError
from runner.group import Grouper
from runner.notify import STATUS_MAX, Notifier, NotifySettings, status_line
from runner.outcome import ExitCode, Outcome
from runner.poll import Poller
from runner.ratelimit import RateLimiter
from runner.shared_budget import SharedBudget
from runner.sharing import beat_heart, follow_wake_ups, keep_running
from runner.startup import limits_for, make_directory, reloadable, runner_id_for
from runner.store import is_postgres_url, open_store
from runner.store.base import Counts, Store
from runner.submit import Submitter
from runner.watch import EventSource, Watcher, watchfiles_events

if TYPE_CHECKING:  # prometheus_client loads only where metrics are served
    from runner.metrics import Metrics

__all__ = ["ExitCode", "Outcome", "Progress", "Runner", "RunnerOptions"]

log = structlog.get_logger("runner.daemon")


Progress = Callable[[Counts], Awaitable[None]]
Signals = AsyncIterator[int]
Reload = Callable[[], Config]
"""Reads the configuration again (file and environment as at startup)."""

EXTEND_EVERY = 5.0
"""While finishing takes longer than expected, ask systemd for more time this often."""
STOP_CHECK_EVERY = 0.2
"""While stopping, how often a second SIGINT (``force_exit``) is noticed."""
STOP_MARGIN = 10.0
"""Seconds beyond the graceful timeout that persisting and closing may take."""


class RunnerOptions(msgspec.Struct):
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
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        reload: Reload | None = None,
    ) -> None:
        self.config = config
        self.options = options
        self.clock = clock or SystemClock()
        self.transport = transport
        self.events = events
        self.progress = progress
        self.notifier = notifier or Notifier(NotifySettings())
        self.metrics = metrics
        self.reload = reload
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self._exit_code = ExitCode.OK
        self._reason: str | None = None
        self._drained = False
        self._limiter: RateLimiter | None = None
        self._budget: SharedBudget | None = None
        self._extended_at: float | None = None

    async def serve(self) -> Outcome:
        config = self.config
        if config.api_key is None:
            raise ConfigError("no API key: set BEM_API_KEY, api.api_key_file, or use --emulator")
        # on PostgreSQL every runner shares the store: it claims its work, and draws its requests
        # from the budget all of them share
        runner_id = runner_id_for(config) if is_postgres_url(config.store_target) else None
        lease = config.store.lease_seconds
        async with open_store(
            config.store_target, runner_id=runner_id, lease_seconds=lease
        ) as store:
            return await self._serve(config, store, runner_id)

    async def _serve(self, config: Config, store: Store, runner_id: str | None) -> Outcome:
        assert config.api_key is not None
        limits = limits_for(config)
        if runner_id is not None:
            self._budget = SharedBudget(
                store, rate=limits["rate"], burst=limits["burst"], clock=self.clock
            )
        limiter = RateLimiter(**limits, clock=self.clock, shared=self._budget)
        self._limiter = limiter
        metrics = self.metrics
        async with (
            BemClient(
                base_url=config.api.base_url,
                api_key=config.api_key.get_secret_value(),
                limiter=limiter,
                transport=self.transport,
                timeout=config.api.timeout_seconds,
                clock=self.clock,
                on_response=metrics.observe_response if metrics is not None else None,
            ) as client,
        ):
            ctx = Context(
                config=config,
                store=store,
                client=client,
                clock=self.clock,
                draining=self.options.drain,
                rng=random.Random(),
                on_call_finished=metrics.observe_call_finished if metrics is not None else None,
                runner_id=runner_id,
            )
            # Signals are ours before READY=1: a stop or reload sent right after never meets
            # the default action (which would kill the process mid-write).
            with self._signal_receiver() as signals:
                await self.startup(ctx)
                await self.main_loop(ctx, signals)
            return await self.shutdown(ctx)

    async def startup(self, ctx: Context) -> None:
        paths = ctx.config.paths
        for key, path in (("paths.inbox", paths.inbox), ("paths.outbox", paths.outbox)):
            make_directory(key, path)
        await ctx.store.recover()
        counts = await ctx.store.counts()
        if self.progress is not None:
            await self.progress(counts)  # what the store held before this run: the baseline
        self.notifier.ready(self._status(counts))
        log.info(
            "runner started",
            mode="drain" if self.options.drain else "run",
            inbox=str(ctx.config.paths.inbox),
            outbox=str(ctx.config.paths.outbox),
            open_calls=counts.open_calls,
            api=ctx.config.api.base_url,
            version=ctx.config.api.version,
            runner=ctx.runner_id,
        )

    def _signal_receiver(self) -> AbstractContextManager[Signals | None]:
        if not self.options.handle_signals:
            return nullcontext()
        return anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    async def main_loop(self, ctx: Context, signals: Signals | None = None) -> None:
        watcher = Watcher(ctx, events=self.events)
        stages: dict[str, Callable[[], Awaitable[None]]] = {
            "watch": watcher.run,
            "group": Grouper(ctx, unsettled_under=watcher.has_pending_under).run,
            "submit": Submitter(ctx, preflight=watcher.confirm_unchanged).run,
            "poll": Poller(ctx).run,
            "deliver": Deliverer(ctx, on_finished=watcher.file_finished).run,
        }
        if ctx.config.webhook.listen is not None:
            from runner.webhook import add_receiver  # uvicorn loads only for a receiver

            add_receiver(ctx, stages)
        running = set(stages)
        all_stopped = anyio.Event()
        resumes = {"watch", "group", "submit", "poll", "deliver"}

        async def run_stage(name: str) -> None:
            try:
                if name in resumes:
                    # a POST whose answer could not be recorded is resolved by listing
                    recover = ctx.store.recover if name == "submit" else None
                    await keep_running(ctx, stages[name], after_outage=recover)
                else:
                    await stages[name]()
            finally:
                running.discard(name)
                if not running:
                    all_stopped.set()

        async with anyio.create_task_group() as tg:
            for name in stages:
                tg.start_soon(run_stage, name, name=f"stage-{name}")
            if signals is not None:
                tg.start_soon(self._watch_signals, ctx, signals, name="signals")
            if ctx.runner_id is not None:
                lease = ctx.config.store.lease_seconds
                heartbeat = beat_heart(ctx, lease_seconds=lease)
                tg.start_soon(self._side_task, "heartbeat", heartbeat, name="heartbeat")
                tg.start_soon(self._side_task, "wake-ups", follow_wake_ups(ctx), name="wake-ups")
            await self._supervise(ctx)
            log.info("stopping: no new files taken, finishing in-flight requests")
            ctx.stop()
            await self._finish_in_flight(all_stopped)
            if not all_stopped.is_set():
                # A POST in flight finishes even when cancelled; closing the connections ends
                # it now, and its outcome is recorded as unknown (resolved on the next start).
                await ctx.client.aclose()
            tg.cancel_scope.cancel()

    async def _side_task(self, name: str, task: Awaitable[None]) -> None:
        """A side task that ends before the runner stops the runner (one that fails, too)."""
        await task
        if not self.should_exit:
            self._stop(ExitCode.API_UNAVAILABLE, f"the {name} task ended")

    async def _finish_in_flight(self, all_stopped: anyio.Event) -> None:
        """Wait for the stages (bounded by the graceful timeout) while telling systemd why."""
        graceful = self.options.graceful_timeout
        deadline = self.clock.now() + graceful
        self.notifier.stopping(status="stopping: finishing in-flight requests")
        while not all_stopped.is_set() and not self.force_exit:
            left = deadline - self.clock.now()
            if left <= 0:
                return
            await self.clock.wait(all_stopped, min(left, STOP_CHECK_EVERY))
            self._extend_stop(deadline)

    def _extend_stop(self, deadline: float) -> None:
        """Finishing takes a while: ask systemd to wait for the rest of the graceful timeout."""
        now = self.clock.now()
        if self._extended_at is None or now - self._extended_at >= EXTEND_EVERY:
            self._extended_at = now
            self.notifier.extend_timeout(max(0.0, deadline - now) + STOP_MARGIN)

    async def _supervise(self, ctx: Context) -> None:
        """Wake on news or every few seconds; decide whether the runner should stop.

        Each turn reads the store, so the watchdog ping at its end also vouches that the store
        answers.
        """
        every = self.options.supervise_every
        if self.notifier.settings.watchdog_every is not None:
            every = min(every, self.notifier.settings.watchdog_every)
        while not self.should_exit:
            if self.reload_requested:
                self._reload(ctx)
            try:
                await self._turn(ctx)
            except StoreUnavailableError as exc:
                ctx.store_health.failed(exc.message, now=ctx.clock.wall())
                self.notifier.status("the store cannot be reached")
            if self.options.drain:
                self._check_store(ctx)
            if self.should_exit:
                return
            self.notifier.watchdog(ctx.clock.now())
            await ctx.nudges.supervisor.wait(every)

    async def _turn(self, ctx: Context) -> None:
        counts = await ctx.store.counts()
        ctx.store_health.reached()
        if self.progress is not None:
            await self.progress(counts)
        if self.metrics is not None:
            await self._observe(ctx, counts)
        self.notifier.status(self._status(counts))
        if self.options.drain:
            await self._check_drain(ctx)

    def _check_store(self, ctx: Context) -> None:
        health = ctx.store_health
        if health.unavailable_for(ctx.clock.wall()) >= ctx.config.api.unreachable_timeout:
            self._stop(
                ExitCode.API_UNAVAILABLE, f"the store cannot be reached: {health.last_error}"
            )

    def _status(self, counts: Counts) -> str:
        return status_line(
            counts.files, counts.open_calls, mode="draining" if self.options.drain else "running"
        )

    async def _observe(self, ctx: Context, counts: Counts) -> None:
        assert self.metrics is not None
        assert self._limiter is not None
        self.metrics.observe_counts(counts)
        self.metrics.observe_limiter(
            rate=self._limiter.current_rate, in_flight=self._limiter.in_flight
        )
        now = ctx.clock.wall()
        overdue = await ctx.store.due_polls(now=now, limit=1)
        self.metrics.observe_poll_lag(now - overdue[0].not_before if overdue else 0.0)

    def _reload(self, ctx: Context) -> None:
        """Apply a re-read configuration: limits and routes now, paths and API on restart."""
        self.reload_requested = False
        if self.reload is None:
            log.warning("reload requested but there is no configuration to re-read")
            return
        self.notifier.reloading()
        try:
            config = reloadable(ctx.config, self.reload())
        except RunnerError as exc:
            log.error("reload failed; keeping the running configuration", error=str(exc))
            self.notifier.ready(f"reload failed: {exc}"[:STATUS_MAX])
            return
        assert self._limiter is not None
        limits = limits_for(config)
        self._limiter.reconfigure(**limits)
        if self._budget is not None:
            self._budget.reconfigure(rate=limits["rate"], burst=limits["burst"])
        ctx.config = config
        self.config = config
        for nudge in ctx.nudges.all():
            nudge.set()
        log.info(
            "configuration reloaded",
            requests_per_second=config.limits.requests_per_second,
            burst=config.limits.burst,
            max_concurrency=config.limits.max_concurrency,
            routes=len(config.route),
        )
        self.notifier.ready("configuration reloaded")

    async def _check_drain(self, ctx: Context) -> None:
        health = ctx.health
        if health.auth_error is not None:
            self._stop(ExitCode.API_UNAVAILABLE, f"bem rejected the API key: {health.auth_error}")
        elif (
            health.unreachable_since is not None
            and health.unreachable_for(ctx.clock.wall()) >= ctx.config.api.unreachable_timeout
        ):
            self._stop(ExitCode.API_UNAVAILABLE, f"bem cannot be reached: {health.last_error}")
        elif ctx.inbox_taken.is_set() and await ctx.store.unfinished_work() == 0:
            self._drained = True
            self.should_exit = True

    def _stop(self, code: ExitCode, reason: str) -> None:
        self._exit_code = code
        self._reason = reason
        self.should_exit = True
        log.error("stopping", reason=reason)

    def request_reload(self, ctx: Context) -> None:
        self.reload_requested = True
        ctx.nudges.supervisor.set()

    async def _watch_signals(self, ctx: Context, signals: Signals) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("signal received; reloading", signal="SIGHUP")
                self.request_reload(ctx)
                continue
            if self.should_exit and signum == signal.SIGINT:
                self.force_exit = True
                log.warning("second interrupt: exiting now")
            else:
                log.info("signal received; shutting down", signal=signal.Signals(signum).name)
                self.should_exit = True
            ctx.stop()

    async def shutdown(self, ctx: Context) -> Outcome:
        with anyio.CancelScope(shield=True):
            counts = await _final_counts(ctx)
        code = self._exit_code
        if code == ExitCode.OK and self.options.drain and not self._drained:
            code = ExitCode.INTERRUPTED
            self._reason = "interrupted before everything was delivered; state kept, run again"
        elif code == ExitCode.OK and self.options.drain and ctx.tally["error"]:
            code = ExitCode.FILE_ERRORS
        log.info(
            "runner stopped",
            exit_code=int(code),
            results=ctx.tally["result"],
            errors=ctx.tally["error"],
            open_calls=counts.open_calls,
        )
        return Outcome(code, counts, dict(ctx.tally), self._reason)


async def _final_counts(ctx: Context) -> Counts:
    """The store's counts, or none when it cannot be reached (it keeps everything anyway)."""
    if ctx.store_health.unavailable_since is None:
        try:
            return await ctx.store.counts()
        except StoreUnavailableError as exc:
            ctx.store_health.failed(exc.message, now=ctx.clock.wall())
    return Counts(files={}, calls={}, open_calls=0)
