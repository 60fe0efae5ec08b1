"""The command line: ``bem-runner run | drain | status | retry | emulator | webhook``.

The only place that reads the process environment, handles exit codes and calls ``sys.exit``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import click

from runner import faults
from runner.errors import RunnerError
from runner.logs import LEVELS, configure_logging

# What a command needs is imported by that command: `bem-runner --help` loads no configuration
# models, no pipeline and no HTTP client (tests/test_imports.py).
if TYPE_CHECKING:
    from runner.config import Config
    from runner.daemon import Outcome, RunnerOptions

PATH_FLAGS = ("inbox", "outbox", "archive", "state")
T = TypeVar("T")
Retarget = Callable[["Config"], "Config"]


def path_options(command: Any) -> Any:
    command = click.option(
        "--store",
        "store_url",
        default=None,
        metavar="URL",
        help="A postgresql:// store shared by several runners (overrides store.url and "
        "BEM_RUNNER_STORE_URL).",
    )(command)
    for name in reversed(PATH_FLAGS):
        command = click.option(
            f"--{name}",
            type=click.Path(path_type=Path),
            default=None,
            help=f"Override paths.{name} from the config.",
        )(command)
    return command


def pipeline_options(command: Any) -> Any:
    command = click.option(
        "--emulator",
        "use_emulator",
        is_flag=True,
        help="Start the built-in bem emulator on a free loopback port and use it.",
    )(command)
    command = click.option(
        "--on-done",
        type=click.Choice(["archive", "delete", "keep"]),
        default=None,
        help="Override inbox.on_done.",
    )(command)
    command = click.option(
        "--settle-seconds", type=float, default=None, help="Override inbox.settle_seconds."
    )(command)
    return path_options(command)


def _set_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config_path"] = value


def _set_log_level(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        configure_logging(value)


def global_options(command: Any) -> Any:
    """``--config`` and ``--log-level`` after the subcommand too (they win over the ones before)."""
    command = click.option(
        "--config",
        type=click.Path(path_type=Path),
        default=None,
        expose_value=False,
        callback=_set_config,
        help="TOML config file (as the global --config).",
    )(command)
    return click.option(
        "--log-level",
        type=click.Choice(LEVELS),
        default=None,
        expose_value=False,
        callback=_set_log_level,
        help="Log level (as the global --log-level).",
    )(command)


class LazyGroup(click.Group):
    """A group whose heavy subcommands are imported only when they run (``--help`` lists them
    from their short help, without importing them)."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "emulator": ("runner.emulator.cli:emulator_command", "Serve the bem-compatible emulator."),
        "webhook": ("runner.webhook_setup:webhook_group", "Set up bem's webhooks (setup)."),
        "store": (
            "runner.store_cli:store_group",
            "Manage the store (migrate).",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module_name, _, attribute = self.lazy[cmd_name][0].partition(":")
            command = getattr(importlib.import_module(module_name), attribute)
            self.add_command(global_options(command), cmd_name)
            _started()
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                rows.append((name, self.lazy[name][1]))
            elif (command := self.get_command(ctx, name)) is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML config file (default: $BEM_RUNNER_CONFIG, else built-in defaults).",
)
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
@click.version_option(package_name="bem-runner")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """Files dropped into an inbox become bem calls; each leaves one result in an outbox."""
    configure_logging(log_level)
    faults.arm(os.environ.get("BEM_RUNNER_CRASH_AT"))
    ctx.obj = {"config_path": config_path, "environ": dict(os.environ)}


def _config(ctx: click.Context, overrides: Mapping[str, Any]) -> Config:
    from runner.outcome import ExitCode

    try:
        return _load(ctx, overrides)()
    except RunnerError as exc:
        click.echo(f"bem-runner: {exc}", err=True)
        sys.exit(ExitCode.USAGE)


def _load(ctx: click.Context, overrides: Mapping[str, Any]) -> Callable[[], Config]:
    """Reads the configuration as at startup: same file, same flags, same environment."""
    path: Path | None = ctx.obj["config_path"]
    environ: dict[str, str] = ctx.obj["environ"]
    from runner.config import load_config

    return lambda: load_config(path, environ=environ, overrides=overrides)


def _overrides(paths: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    """``--store`` and the path flags as ``section.key`` overrides."""
    paths = dict(paths)
    overrides: dict[str, Any] = {"store.url": paths.pop("store_url", None)}
    overrides.update({f"paths.{k}": v for k, v in paths.items()})
    overrides.update(more)
    return overrides


@cli.command()
@pipeline_options
@global_options
@click.option(
    "--metrics-addr",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics here (overrides service.metrics_addr).",
)
@click.pass_context
def run(
    ctx: click.Context,
    /,
    use_emulator: bool,
    on_done: str | None,
    settle_seconds: float | None,
    metrics_addr: str | None,
    **paths: Path | None,
) -> None:
    """Run as a daemon until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    from runner.daemon import RunnerOptions

    overrides = _overrides(
        paths,
        **{
            "inbox.on_done": on_done,
            "inbox.settle_seconds": settle_seconds,
            "service.metrics_addr": metrics_addr,
        },
    )
    config = _config(ctx, overrides)
    outcome = _execute(
        config,
        RunnerOptions(drain=False, graceful_timeout=config.service.graceful_timeout),
        use_emulator=use_emulator,
        reload=_load(ctx, overrides),
        environ=ctx.obj["environ"],
    )
    sys.exit(outcome.exit_code)


@cli.command()
@pipeline_options
@global_options
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar (default: on when stderr is a terminal).",
)
@click.pass_context
def drain(
    ctx: click.Context,
    /,
    use_emulator: bool,
    on_done: str | None,
    settle_seconds: float | None,
    progress: bool | None,
    **paths: Path | None,
) -> None:
    """Take what is in the inbox now, wait until every file is delivered, then exit.

    Exit codes: 0 all completed, 1 some file ended in an error, 2 usage or config error,
    3 bem rejected the API key or cannot be reached (state kept, nothing lost),
    4 interrupted by a signal before everything was delivered (state kept; run again).
    """
    from runner.daemon import RunnerOptions

    config = _config(
        ctx, _overrides(paths, **{"inbox.on_done": on_done, "inbox.settle_seconds": settle_seconds})
    )
    show = sys.stderr.isatty() if progress is None else progress
    outcome = _execute(
        config,
        RunnerOptions(drain=True, graceful_timeout=config.service.graceful_timeout),
        use_emulator=use_emulator,
        show_progress=show,
        environ=ctx.obj["environ"],
    )
    results = outcome.delivered.get("result", 0)
    errors = outcome.delivered.get("error", 0)
    summary = f"drained: {results} results, {errors} errors → {config.paths.outbox}"
    if outcome.reason:
        summary += f" — stopped: {outcome.reason}"
    click.echo(summary)
    sys.exit(outcome.exit_code)


def _execute(
    config: Config,
    options: RunnerOptions,
    *,
    use_emulator: bool,
    environ: Mapping[str, str],
    show_progress: bool = False,
    reload: Callable[[], Config] | None = None,
) -> Outcome:
    # The runner's client opens its pool on aiohttp: imported now, with the command's modules.
    import runner.api.transport  # noqa: F401
    from runner.daemon import Runner
    from runner.notify import Notifier, notify_settings

    settings = notify_settings(environ, pid=os.getpid())

    async def main() -> Outcome:
        async with _api_target(use_emulator) as retarget:
            with ExitStack() as stack:
                notifier = stack.enter_context(Notifier(settings))
                metrics = None
                if config.service.metrics_addr:
                    # prometheus_client loads only when metrics are served
                    from runner.metrics import Metrics, serve_metrics
                    from runner.startup import runner_id_for

                    metrics = Metrics(runner_id_for(config))
                    host, port = stack.enter_context(
                        serve_metrics(metrics, config.service.metrics_addr)
                    )
                    click.echo(f"metrics at http://{host}:{port}/metrics", err=True)
                progress = None
                if show_progress:
                    from runner.progress import DrainProgress

                    progress = stack.enter_context(DrainProgress(sys.stderr)).update
                runner = Runner(
                    retarget(config),
                    options,
                    progress=progress,
                    notifier=notifier,
                    metrics=metrics,
                    reload=(lambda: retarget(reload())) if reload is not None else None,
                )
                return await runner.serve()

    return _run(main)


def _run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main``; any error the runner raised on purpose is a message and exit code 2."""
    import anyio

    from runner.outcome import ExitCode

    _started()
    try:
        return anyio.run(main)
    except* RunnerError as group:
        first = _first_leaf(group)
        click.echo(f"bem-runner: {first}", err=True)
        sys.exit(ExitCode.USAGE)


def _first_leaf(group: BaseExceptionGroup[RunnerError]) -> RunnerError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, RunnerError)
    return leaf


@asynccontextmanager
async def _api_target(use_emulator: bool) -> AsyncIterator[Retarget]:
    """Yields how to point a configuration at the API: as it is, or at an in-process emulator."""
    if not use_emulator:
        yield lambda config: config
        return
    import msgspec.structs

    from runner.credentials import Secret
    from runner.emulator import Emulator, EmulatorSettings, serve_emulator  # only when used

    settings = EmulatorSettings(latency_min=0.2, latency_max=1.0)
    async with serve_emulator(Emulator(settings)) as base_url:
        click.echo(f"bem emulator at {base_url}", err=True)

        def retarget(config: Config) -> Config:
            api = msgspec.structs.replace(config.api, base_url=base_url)
            return msgspec.structs.replace(config, api=api, api_key=Secret(settings.api_key))

        yield retarget


@cli.command()
@path_options
@global_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--metrics-addr",
    default=None,
    metavar="HOST:PORT",
    help="Where the running daemon serves metrics (default: service.metrics_addr).",
)
@click.pass_context
def status(
    ctx: click.Context, /, as_json: bool, metrics_addr: str | None, **paths: Path | None
) -> None:
    """Counts by state, open calls and recent errors; live figures from a running daemon."""
    config = _config(ctx, _overrides(paths, **{"service.metrics_addr": metrics_addr}))
    from runner.status import collect_status, render_status
    from runner.store import open_store

    async def main() -> dict[str, Any]:
        async with open_store(config.store_target, read_only=True) as store:
            return await collect_status(store, now=time.time())

    from runner.metrics import fetch_live, render_live

    report = _run(main)
    address = config.service.metrics_addr
    live = fetch_live(address) if address else None
    if as_json:
        if address:
            report["live"] = live.as_dict() if live is not None else None
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_status(report))
    if address:
        click.echo()
        click.echo(render_live(live, address))


@cli.command()
@path_options
@global_options
@click.pass_context
def retry(ctx: click.Context, /, **paths: Path | None) -> None:
    """Requeue every file that ended in an error."""
    config = _config(ctx, _overrides(paths))
    from runner.retry import requeue_failed
    from runner.store import open_store

    async def main() -> tuple[list[str], list[tuple[str, str]]]:
        async with open_store(config.store_target) as store:
            return await requeue_failed(store, config)

    requeued, impossible = _run(main)
    for rel, why in impossible:
        click.echo(f"cannot retry {rel}: {why}", err=True)
    click.echo(f"requeued {len(requeued)} file(s)")


def _started() -> None:
    """The command's modules are imported: collect garbage from now on (see :func:`main`)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main() -> None:
    # Start-up creates a few hundred thousand objects (modules, classes, the configuration) that
    # live as long as the process. Looking for garbage among them while they are made is wasted
    # work, and so is walking them again at every full collection afterwards: collection is off
    # until the command's modules are imported, and then they are frozen out of its reach
    # (`bench/startup.py`). Whatever path a command takes, collection is back on when it runs.
    gc.disable()
    try:
        cli(prog_name="bem-runner")
    finally:
        gc.enable()
