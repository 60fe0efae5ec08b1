"""How bem-runner's cost grows: many small files, a huge inbox scan, one very large file.

    python bench/scale.py --files 1000 10000 100000   # drains at a high rate limit
    python bench/scale.py --files 10000 --batch 20    # the same, 20 files per call ("window")
    python bench/scale.py --scan 100000               # runner.scan.scan_inbox over N files
    python bench/scale.py --big-mb 500                # one file, streamed as multipart
    python bench/scale.py --files 2000 --store postgresql --runners 1,2,3

Every drain is ``python -m runner drain`` in its own process against the emulator (another
process); wall time, CPU and peak RSS are those of the drain process alone.

``--store postgresql`` starts a throwaway PostgreSQL server (bench/pgserver.py) and drains each
inbox with N runner processes at once on one store (a fresh database per run), after the same
drain on SQLite for reference: wall time is the last runner's, CPU is summed over the runners,
and the database's transactions and statements per file are read from ``pg_stat_database`` and
``pg_stat_statements`` before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import harness
import pgserver
from compare import markdown_table

WORKFLOW = "invoices"
SCAN_SNIPPET = """
import json, sys, time
from pathlib import Path
from runner.scan import scan_inbox
inbox = Path(sys.argv[1])
timings = []
for _ in range(3):
    started = time.perf_counter()
    report = scan_inbox(inbox)
    timings.append(time.perf_counter() - started)
print(json.dumps({"entries": len(report.entries), "seconds": timings}))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="*", default=[], help="drain sizes")
    parser.add_argument("--rate", type=float, default=1000.0, help="rate limit for the drains")
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--latency", default="0.05-0.2")
    parser.add_argument(
        "--rescan-seconds",
        type=float,
        default=1.0,
        help="inbox.rescan_seconds of the drains (the deliverer also idles this long after a "
        "full batch of 200 when nothing nudges it; 60 is the default)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="route the drains' files through a 'window' group of this many files per call "
        "(0: one call per file, the default routing)",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: drain with --runners processes on one throwaway PostgreSQL store, "
        "beside the same drain on SQLite",
    )
    parser.add_argument(
        "--runners",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1],
        help="runner processes sharing the PostgreSQL store, comma-separated: 1,2,3",
    )
    parser.add_argument("--scan", type=int, default=0, help="files in the scanned inbox")
    parser.add_argument("--big-mb", type=int, default=0, help="size of the one large file")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bem-scale-") as tmp:
        root = args.workdir or Path(tmp)
        ok = True
        if args.files and args.store == "postgresql":
            ok &= store_drains(args, root / "stores")
        elif args.files:
            ok &= drains(args, root / "drains")
        if args.scan:
            ok &= scan(args.scan, root / "scan")
        if args.big_mb:
            ok &= big_file(args, root / "big")
    return 0 if ok else 1


def drain(
    args: argparse.Namespace, base: Path, emu: harness.Emulator, **sections: dict[str, object]
) -> tuple[harness.Measured, dict[str, object]]:
    routes = []
    if args.batch:
        routes.append(
            {
                "glob": f"{WORKFLOW}/**",
                "workflow": WORKFLOW,
                "group": "window",
                "batch_max_files": args.batch,
                "batch_window_seconds": 1.0,
            }
        )
    config = harness.runner_config(
        base / "bem-runner.toml", rate=args.rate, burst=args.burst, routes=routes, **sections
    )
    emu.reset_stats()
    env = harness.bench_env(emu.base_url)
    measured = harness.run_measured(
        harness.drain_argv(config, base), env=env, timeout=args.timeout, logs=base / "logs"
    )
    return measured, emu.stats()


def drains(args: argparse.Namespace, root: Path) -> bool:
    table = [["files", "wall s", "files/s", "CPU s", "CPU ms/file", "net of start-up",
              "peak RSS MB", "requests/file", "delivered", "duplicates"]]  # fmt: skip
    ok = True
    notes: list[str] = []
    with harness.emulator(rate=args.rate, burst=args.burst, latency=args.latency) as emu:
        # what a drain pays before its first file: imports, store, client (an empty inbox)
        (root / "start-up" / "inbox" / WORKFLOW).mkdir(parents=True)
        startup, _ = drain(
            args, root / "start-up", emu, inbox={"rescan_seconds": args.rescan_seconds}
        )
        for count in args.files:
            base = root / str(count)
            digests = harness.make_inputs(base / "inbox" / WORKFLOW, count)
            create_us = harness.file_creation_us(base / "file-creation-probe")
            measured, stats = drain(args, base, emu, inbox={"rescan_seconds": args.rescan_seconds})
            delivered, errors = harness.count_outputs(base / "outbox")
            duplicates, _ = harness.duplicate_calls(stats, digests)
            requests = harness.api_requests(stats)
            ok &= measured.exit_code == 0 and delivered == count and duplicates == 0
            table.append(
                [
                    str(count),
                    f"{measured.wall_seconds:.1f}",
                    f"{count / measured.wall_seconds:.0f}",
                    f"{measured.cpu_seconds:.1f}",
                    f"{measured.cpu_seconds * 1000 / count:.2f}",
                    f"{(measured.cpu_seconds - startup.cpu_seconds) * 1000 / count:.2f}",
                    f"{measured.peak_rss_mb:.0f}",
                    f"{requests['total'] / count:.2f}",
                    f"{delivered}/{count}" + (f" ({errors} errors)" if errors else ""),
                    str(duplicates),
                ]
            )
            print(f"  {count} files: {measured.wall_seconds:.1f} s", file=sys.stderr, flush=True)
            note = harness.slow_file_creation_note(create_us, f"the {count}-file drain's folder")
            if note is not None:
                notes.append(note)
    print(
        f"drains: rate limit {args.rate:g} req/s (burst {args.burst}), latency {args.latency} s, "
        f"inbox.rescan_seconds {args.rescan_seconds:g}, "
        + (f"{args.batch} files per call" if args.batch else "one call per file")
        + f"; start-up (a drain of an empty inbox) {startup.cpu_seconds:.2f} s CPU\n"
    )
    print(markdown_table(table) + "".join("\n" + note for note in notes) + "\n", flush=True)
    return ok


def store_drains(args: argparse.Namespace, root: Path) -> bool:
    """Each size on SQLite (one runner), then on PostgreSQL with each number of runners."""
    table = [["store", "runners", "files", "wall s", "files/s", "CPU ms/file", "DB xacts/file",
              "DB statements/file", "requests/file", "delivered", "duplicates"]]  # fmt: skip
    ok = True
    with (
        harness.emulator(rate=args.rate, burst=args.burst, latency=args.latency) as emu,
        pgserver.throwaway_server() as server,
    ):
        for count in args.files:
            runs: list[tuple[str, int]] = [("sqlite", 1)]
            runs += [("postgresql", n) for n in args.runners]
            for store, runners in runs:
                row, good = store_drain(args, root / f"{count}-{store}-{runners}", emu, server,
                                        count=count, store=store, runners=runners)  # fmt: skip
                table.append(row)
                ok &= good
                print(f"  {count} files, {store} × {runners}: {row[3]} s", file=sys.stderr,
                      flush=True)  # fmt: skip
    print(
        f"drains: rate limit {args.rate:g} req/s (burst {args.burst}), latency {args.latency} s, "
        f"inbox.rescan_seconds {args.rescan_seconds:g}, one call per file; PostgreSQL "
        "with its durability defaults on this machine, a fresh database per run\n"
    )
    print(markdown_table(table) + "\n", flush=True)
    return ok


def store_drain(
    args: argparse.Namespace,
    base: Path,
    emu: harness.Emulator,
    server: pgserver.Server,
    *,
    count: int,
    store: str,
    runners: int,
) -> tuple[list[str], bool]:
    digests = harness.make_inputs(base / "inbox" / WORKFLOW, count)
    config = harness.runner_config(
        base / "bem-runner.toml",
        rate=args.rate,
        burst=args.burst,
        inbox={"rescan_seconds": args.rescan_seconds},
    )
    env = harness.bench_env(emu.base_url)
    url = None
    before = after = pgserver.Activity(0, 0)
    if store == "postgresql":
        database = base.name.replace("-", "_")
        url = server.new_database(database)
        env["PGPASSWORD"] = server.password
        before = server.activity(database)
    emu.reset_stats()
    measured = harness.combined(
        harness.run_measured_together(
            [harness.drain_argv(config, base, store=url)] * runners,
            env=env,
            timeout=args.timeout,
            logs=base / "logs",
        )
    )
    if url is not None:
        after = server.activity(database)
    stats = emu.stats()
    delivered, errors = harness.count_outputs(base / "outbox")
    duplicates, _ = harness.duplicate_calls(stats, digests)
    used = after - before
    database_columns = ["—", "—"]
    if url is not None:
        database_columns = [f"{used.transactions / count:.1f}", f"{used.statements / count:.1f}"]
    good = measured.exit_code == 0 and delivered == count and duplicates == 0
    wall = measured.wall_seconds
    row = [
        store,
        str(runners),
        str(count),
        f"{wall:.1f}",
        f"{count / wall:.0f}",
        f"{measured.cpu_seconds * 1000 / count:.2f}",
        *database_columns,
        f"{harness.api_requests(stats)['total'] / count:.2f}",
        f"{delivered}/{count}" + (f" ({errors} errors)" if errors else ""),
        str(duplicates) + ("" if measured.exit_code == 0 else f" (exit {measured.exit_code})"),
    ]
    return row, good


def scan(count: int, root: Path) -> bool:
    inbox = root / "inbox"
    harness.make_inputs(inbox / WORKFLOW, count, size=100)
    measured = harness.run_measured(
        [harness.PYTHON, "-c", SCAN_SNIPPET, str(inbox)],
        env=harness.bench_env("http://unused"),
        logs=root / "logs",
    )
    if measured.exit_code != 0:
        print(measured.stderr, file=sys.stderr)
        return False
    result = json.loads(measured.stdout)
    timings = ", ".join(f"{s:.2f}" for s in result["seconds"])
    print(
        f"scan_inbox over {result['entries']} files: {timings} s (three passes); "
        f"peak RSS of the scanning process {measured.peak_rss_mb:.0f} MB\n",
        flush=True,
    )
    return bool(result["entries"] == count)


def big_file(args: argparse.Namespace, root: Path) -> bool:
    size = args.big_mb * 1_000_000
    folder = root / "inbox" / WORKFLOW
    folder.mkdir(parents=True, exist_ok=True)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with (folder / "scan.pdf").open("wb") as fh:
        written = 0
        while written < size:
            piece = chunk[: size - written]
            fh.write(piece)
            written += len(piece)
    with harness.emulator(rate=args.rate, burst=args.burst, latency="0.1-0.2") as emu:
        measured, stats = drain(
            args,
            root,
            emu,
            api={"multipart_min_bytes": 1_000_000, "timeout_seconds": 600.0},
            inbox={"max_file_bytes": size + 1},
        )
    delivered, errors = harness.count_outputs(root / "outbox")
    print(
        f"one {args.big_mb} MB file (multipart, streamed): wall {measured.wall_seconds:.1f} s, "
        f"CPU {measured.cpu_seconds:.1f} s, peak RSS {measured.peak_rss_mb:.0f} MB, "
        f"delivered {delivered}, errors {errors}, calls {stats['calls_total']}\n",
        flush=True,
    )
    return measured.exit_code == 0 and delivered == 1


if __name__ == "__main__":
    raise SystemExit(main())
