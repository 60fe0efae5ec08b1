"""``bem-runner emulator``: serve the emulator until SIGINT or SIGTERM."""

from __future__ import annotations

import signal

import anyio
import click

from runner.emulator.emulator import Emulator
from runner.emulator.errors import EmulatorError
from runner.emulator.server import serve_emulator
from runner.emulator.settings import EmulatorSettings, parse_settings
from runner.errors import ConfigError

DEFAULT_API_KEY = EmulatorSettings().api_key


@click.command("emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=0,
    type=click.IntRange(0, 65535),
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--api-key",
    envvar="BEM_API_KEY",
    show_envvar=True,
    help=f"The key clients must send in x-api-key [default: {DEFAULT_API_KEY}].",
)
@click.option(
    "--workflow",
    "workflows",
    multiple=True,
    help="A workflow that exists (repeatable). Without any, every name exists "
    "except names starting 'unknown-'.",
)
@click.option(
    "--latency",
    default="0.5-2",
    show_default=True,
    help="Seconds a call takes to finish: 'MIN-MAX' (uniform) or one number.",
)
@click.option(
    "--failure-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that an item fails.",
)
@click.option(
    "--error-5xx-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a request is answered 500/502/503 without doing anything.",
)
@click.option(
    "--accept-then-500-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a POST creates its call(s) and then answers 500.",
)
@click.option(
    "--drop-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a request is processed and the connection dropped.",
)
@click.option(
    "--slow-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a response is delayed by --slow-seconds.",
)
@click.option("--slow-seconds", type=float, default=5.0, show_default=True)
@click.option(
    "--rate-limit",
    "rate_limit",
    type=float,
    default=None,
    help="Requests per second allowed over all API routes (token bucket); "
    "unlimited when not given.",
)
@click.option("--rate-limit-burst", type=int, default=10, show_default=True)
@click.option(
    "--retry-after-format",
    type=click.Choice(["seconds", "http-date"]),
    default="seconds",
    show_default=True,
)
@click.option(
    "--list-visibility-lag",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds before a new call shows in GET /v3/calls.",
)
@click.option(
    "--wait-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds ?wait=true blocks before answering 202.",
)
@click.option(
    "--webhook-drop-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a webhook event is never delivered.",
)
@click.option(
    "--webhook-duplicate-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a webhook event is delivered twice.",
)
@click.option(
    "--webhook-delay",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds between an event and its first delivery.",
)
@click.option(
    "--webhook-reorder-seconds",
    type=float,
    default=0.0,
    show_default=True,
    help="Random extra delay up to this, so deliveries overtake each other.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of all randomness (call IDs, latencies, failures, faults).",
)
def emulator_command(
    host: str,
    port: int,
    api_key: str | None,
    workflows: tuple[str, ...],
    latency: str,
    rate_limit: float | None,
    **knobs: object,
) -> None:
    """Serve the bem-compatible emulator until SIGINT or SIGTERM; prints the base URL."""
    try:
        latency_min, latency_max = parse_latency(latency)
        settings = parse_settings(
            {
                **knobs,
                **({"api_key": api_key} if api_key else {}),
                "workflows": list(workflows),
                "latency_min": latency_min,
                "latency_max": latency_max,
                "rate_limit_rps": rate_limit,
            }
        )
    except ConfigError as exc:
        raise click.UsageError(exc.message) from exc
    try:
        anyio.run(_serve, Emulator(settings), host, port)
    except EmulatorError as exc:
        raise click.ClickException(exc.message) from exc


def parse_latency(text: str) -> tuple[float, float]:
    """'0.5-2' → (0.5, 2.0); '1' → (1.0, 1.0)."""
    low, separator, high = text.partition("-")
    try:
        latency_min = float(low)
        latency_max = float(high) if separator else latency_min
    except ValueError as exc:
        raise ConfigError(f"--latency: {text!r} is not 'MIN-MAX' or a number of seconds") from exc
    return latency_min, latency_max


async def _serve(emulator: Emulator, host: str, port: int) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serve_emulator(emulator, host=host, port=port) as base_url:
            click.echo(base_url)
            if emulator.settings.api_key == DEFAULT_API_KEY:
                click.echo(f"API key: {DEFAULT_API_KEY}", err=True)
            async for _ in signals:
                break
