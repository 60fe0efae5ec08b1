"""bem-runner side by side with the scripts users write instead, on one emulator.

    python bench/compare.py --files 300 --rate 50 --latency 1-3

Starts the emulator (a subprocess) with a rate limit and a latency range, creates the input
files once and runs each client, one after another, on a fresh copy of them:

- ``bem-runner``: ``python -m runner drain`` with ``limits.requests_per_second`` = the rate;
- ``async``: ``bench/baselines/async_gather.py`` (AsyncBem, gather + semaphore, 1 s polls);
- ``sequential``: ``bench/baselines/sequential.py`` (Bem, one file at a time, 1 s polls), on the
  first ``--sequential-files`` inputs only (it is slow by construction); its wall time for all
  files is then extrapolated and marked ``~``.

Time to result (p50/p95/max) is, per result document, its write time minus the call's
``finishedAt`` as the emulator reports it (``bench/webhooks.py``); *wall÷bound* divides the wall
time by the drain's physical bound: files ÷ rate for the POSTs, plus the longest call.

``--runners N`` runs bem-runner as N ``drain`` processes at once on one PostgreSQL store (a
throwaway server, bench/pgserver.py; ``--store postgresql`` does so with one), sharing R: its
row is their sum (wall time the last one's, CPU summed).

``--webhook`` adds ``bem-runner+webhook`` (the same drain with its webhook receiver, the
emulator delivering signed events to it; see ``bench/webhooks.py``). ``--api-version v2`` runs
bem-runner with ``api.version = "v2"``.

Prints one table; ``--json`` also writes every figure to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import harness
import pgserver
import webhooks

WORKFLOW = "invoices"
CLIENTS = ("bem-runner", "async", "sequential")


@dataclass
class Row:
    client: str
    files: int
    wall_seconds: float
    extrapolated: bool
    rate_fraction: float
    best_10s_fraction: float
    rate_limited: int
    rate_limited_after_10s: int
    submits_per_file: float
    polls_per_file: float
    cpu_seconds: float
    cpu_ms_per_file: float
    startup_cpu_seconds: float
    net_cpu_ms_per_file: float
    user_ms_per_file: float
    """The CPU per file split: in the runner's own code and libraries (user) and in the kernel on
    its behalf (system: file writes, fsyncs, renames, sockets)."""
    system_ms_per_file: float
    peak_rss_mb: float
    delivered: int
    errors: int
    duplicates: int
    never_sent: int
    exit_code: int
    result_p50_seconds: float | None = None
    result_p95_seconds: float | None = None
    result_max_seconds: float | None = None
    bound_seconds: float | None = None
    """files ÷ rate for the POSTs plus the longest call: no drain can be faster."""
    requests_per_file: float = 0.0
    runners: int = 1
    file_create_us: float | None = None
    """CPU µs to create a file next to the outbox just before the run
    (:func:`harness.file_creation_us`): what each result document's new file cost the kernel."""
    """bem-runner processes sharing one store (and R)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="emulator rate limit, req/s")
    parser.add_argument("--burst", type=int, default=10, help="emulator token bucket size")
    parser.add_argument(
        "--runner-rate",
        type=float,
        default=None,
        help="bem-runner's limits.requests_per_second (default: --rate); set it above --rate "
        "to see how the runner recovers from 429s",
    )
    parser.add_argument("--latency", default="1-3", help="seconds a call takes: MIN-MAX")
    parser.add_argument(
        "--api-version", choices=("v3", "v2"), default="v3", help="bem-runner's api.version"
    )
    parser.add_argument(
        "--runners",
        type=int,
        default=1,
        help="bem-runner processes sharing one PostgreSQL store and the rate limit",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="bem-runner's store (postgresql: a throwaway server; implied by --runners > 1)",
    )
    parser.add_argument("--concurrency", type=int, default=50, help="async script's semaphore")
    parser.add_argument(
        "--sequential-files",
        type=int,
        default=60,
        help="files the sequential script processes (0: all)",
    )
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset")
    parser.add_argument(
        "--webhook",
        action="store_true",
        help=f"also run {webhooks.CLIENT} and show time to result from bem's event",
    )
    parser.add_argument(
        "--emulator-arg",
        action="append",
        default=[],
        help="extra emulator flag, e.g. --emulator-arg=--accept-then-500-rate=0.02",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per client, seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    if args.webhook:
        clients.insert(clients.index("bem-runner") + 1 if "bem-runner" in clients else 0,
                       webhooks.CLIENT)  # fmt: skip
    unknown = set(clients) - set(CLIENTS) - {webhooks.CLIENT}
    if unknown:
        print(f"unknown client(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bem-bench-") as tmp:
        root = args.workdir or Path(tmp)
        rows = run_all(args, clients, root)
    print(render(rows, args))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(r.exit_code == 0 and r.never_sent == 0 for r in rows) else 1


def run_all(args: argparse.Namespace, clients: list[str], root: Path) -> list[Row]:
    source = root / "source" / WORKFLOW
    digests = harness.make_inputs(source, args.files)
    rows = []
    with (
        harness.emulator(
            rate=args.rate, burst=args.burst, latency=args.latency, extra=args.emulator_arg
        ) as emu,
        store_server(args) as server,
    ):
        for client in clients:
            rows.append(run_client(client, args, emu, root, digests, server))
            print(f"  {client}: {rows[-1].wall_seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


@contextmanager
def store_server(args: argparse.Namespace) -> Iterator[pgserver.Server | None]:
    """A throwaway PostgreSQL server when bem-runner's runs need one."""
    if args.runners > 1 or args.store == "postgresql":
        with pgserver.throwaway_server() as server:
            yield server
    else:
        yield None


def run_client(
    client: str,
    args: argparse.Namespace,
    emu: harness.Emulator,
    root: Path,
    digests: list[str],
    server: pgserver.Server | None = None,
) -> Row:
    base = root / client
    harness.copy_inputs(root / "source", base / "inbox")
    env = harness.bench_env(emu.base_url)
    files = len(digests)
    if client == "sequential" and 0 < args.sequential_files < files:
        files = args.sequential_files
    port = webhooks.free_port() if client == webhooks.CLIENT else None
    if port is not None:
        env["BEM_WEBHOOK_SECRET"] = webhooks.subscribe(emu, f"{WORKFLOW}-transform", port)
    store, runners = None, 1
    if server is not None and client in ("bem-runner", webhooks.CLIENT):
        store = server.new_database(client.replace("-", "_").replace("+", "_"))
        env["PGPASSWORD"] = server.password
        runners = args.runners if client == "bem-runner" else 1  # one webhook port each
    argv = client_argv(client, args, base, files, webhook_port=port, store=store)
    startup = harness.run_measured(startup_argv(client, args, base, argv, port, store), env=env,
                                   logs=base / "logs-startup")  # fmt: skip
    file_create_us = harness.file_creation_us(base / "file-creation-probe")
    emu.reset_stats()
    with harness.StatsSampler(emu) as sampler:
        measured = harness.combined(
            harness.run_measured_together(
                [argv] * runners, env=env, timeout=args.timeout, logs=base / "logs"
            )
        )
    stats = emu.stats()
    if port is not None:
        webhooks.unsubscribe(emu)
    to_result = webhooks.times_to_result(base / "outbox")
    requests = harness.api_requests(stats)
    duplicates, never_sent = harness.duplicate_calls(stats, digests[:files])
    delivered, errors = harness.count_outputs(base / "outbox")
    wall = measured.wall_seconds
    return Row(
        client=client,
        files=files,
        wall_seconds=wall * len(digests) / files,
        extrapolated=files < len(digests),
        rate_fraction=(requests["total"] - int(stats["rate_limited"])) / wall / args.rate,
        best_10s_fraction=sampler.best_window_rate(10.0) / args.rate,
        rate_limited=int(stats["rate_limited"]),
        rate_limited_after_10s=sampler.rate_limited_after(10.0),
        submits_per_file=requests["submit"] / files,
        polls_per_file=requests["poll"] / files,
        cpu_seconds=measured.cpu_seconds,
        cpu_ms_per_file=measured.cpu_seconds * 1000 / files,
        startup_cpu_seconds=startup.cpu_seconds * runners,
        net_cpu_ms_per_file=(measured.cpu_seconds - startup.cpu_seconds * runners) * 1000 / files,
        user_ms_per_file=measured.user_seconds * 1000 / files,
        system_ms_per_file=measured.system_seconds * 1000 / files,
        peak_rss_mb=measured.peak_rss_mb,
        delivered=delivered,
        errors=errors,
        duplicates=duplicates,
        never_sent=never_sent,
        exit_code=measured.exit_code,
        result_p50_seconds=webhooks.percentile(to_result, 0.50) if to_result else None,
        result_p95_seconds=webhooks.percentile(to_result, 0.95) if to_result else None,
        result_max_seconds=max(to_result) if to_result else None,
        bound_seconds=len(digests) / args.rate + longest_call(args.latency),
        requests_per_file=requests["total"] / files,
        runners=runners,
        file_create_us=file_create_us,
    )


def longest_call(latency: str) -> float:
    """The upper end of ``--latency`` (``"2-6"`` → 6.0, ``"3"`` → 3.0)."""
    return float(latency.split("-")[-1])


def startup_argv(
    client: str,
    args: argparse.Namespace,
    base: Path,
    argv: list[str],
    webhook_port: int | None,
    store: str | None,
) -> list[str]:
    """What a client pays before its first file: bem-runner drains an empty inbox (its imports,
    store and client as in the real run); a script shows its help (its imports)."""
    if client not in ("bem-runner", webhooks.CLIENT):
        return [*argv, "--help"]
    empty = base / "startup"
    (empty / "inbox").mkdir(parents=True, exist_ok=True)
    return client_argv(client, args, empty, 0, webhook_port=webhook_port, store=store)


def client_argv(
    client: str,
    args: argparse.Namespace,
    base: Path,
    files: int,
    webhook_port: int | None = None,
    store: str | None = None,
) -> list[str]:
    if client in ("bem-runner", webhooks.CLIENT):
        rate = args.runner_rate or args.rate
        path = base / "bem-runner.toml"
        sections: dict[str, dict[str, object]] = {"api": {"version": args.api_version}}
        if webhook_port:
            sections["webhook"] = webhooks.webhook_section(webhook_port)
        config = harness.runner_config(path, rate=rate, burst=args.burst, routes=(), **sections)
        return harness.drain_argv(config, base, store=store)
    script = harness.REPO / "bench" / "baselines"
    common = ["--input-dir", str(base / "inbox" / WORKFLOW), "--workflow", WORKFLOW]
    common += ["--output-dir", str(base / "outbox")]
    if client == "async":
        return [harness.PYTHON, str(script / "async_gather.py"), *common,
                "--concurrency", str(args.concurrency)]  # fmt: skip
    return [harness.PYTHON, str(script / "sequential.py"), *common, "--limit", str(files)]


def render(rows: list[Row], args: argparse.Namespace) -> str:
    reference = next((r for r in rows if r.client == "bem-runner"), None)
    header = (
        f"{args.files} files, rate limit {args.rate:g} req/s (burst {args.burst}), "
        f"latency {args.latency} s, async concurrency {args.concurrency}"
    )
    if args.runner_rate:
        header += f", bem-runner configured for {args.runner_rate:g} req/s"
    if args.api_version != "v3":
        header += f", bem-runner on api {args.api_version}"
    if args.runners > 1 or args.store == "postgresql":
        header += f", bem-runner as {args.runners} runner(s) on one PostgreSQL store"
    columns = [
        "client", "wall s", "wall÷bound", "ok req/s÷R", "best 10s÷R", "429s", "429s>10s",
        "submit/file", "poll/file", "req/file", "result p50 s", "result p95 s", "result max s",
        "CPU s/1k files", "net of startup", "peak RSS MB", "delivered", "errors", "duplicates",
    ]  # fmt: skip
    table = [columns]
    for row in rows:
        wall = f"{'~' if row.extrapolated else ''}{row.wall_seconds:.1f}"
        if reference is not None and row is not reference:
            wall += f" ({row.wall_seconds / reference.wall_seconds:.1f}×)"
        cpu = f"{row.cpu_ms_per_file:.1f}"
        if reference is not None and row is not reference:
            cpu += f" ({row.cpu_ms_per_file / reference.cpu_ms_per_file:.1f}×)"
        table.append(
            [
                row.client + (f" ×{row.runners}" if row.runners > 1 else ""),
                wall,
                _ratio(row.wall_seconds, row.bound_seconds),
                f"{row.rate_fraction:.2f}",
                f"{row.best_10s_fraction:.2f}",
                str(row.rate_limited),
                str(row.rate_limited_after_10s),
                f"{row.submits_per_file:.2f}",
                f"{row.polls_per_file:.2f}",
                f"{row.requests_per_file:.2f}",
                _seconds(row.result_p50_seconds),
                _seconds(row.result_p95_seconds),
                _seconds(row.result_max_seconds),
                cpu,
                f"{row.net_cpu_ms_per_file:.1f}",
                f"{row.peak_rss_mb:.0f}",
                f"{row.delivered}/{row.files}",
                str(row.errors),
                str(row.duplicates),
            ]
        )
    notes = [
        note
        for row in rows
        if row.file_create_us is not None
        and (note := harness.slow_file_creation_note(row.file_create_us, f"{row.client}'s folder"))
    ]
    return header + "\n\n" + markdown_table(table) + "".join("\n" + note for note in notes)


def _ratio(value: float, bound: float | None) -> str:
    return "—" if not bound else f"{value / bound:.2f}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(table: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
             for line in table]  # fmt: skip
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
