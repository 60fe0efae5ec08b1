"""CPU per request of bem-runner's client on each HTTP transport, against the emulator.

The same :class:`runner.api.BemClient` posts ``--requests`` single-file calls (``--in-flight`` at
a time) and then reads them back in pages, once on httpx's own transport (httpcore) and once on
the default one (aiohttp, :mod:`runner.api.transport`). The figure is this process's CPU time
per request; the emulator runs in its own process and is not counted.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import harness
import httpx

from runner.api import BemClient, CallFilter, UploadFile
from runner.logs import configure_logging

WORKFLOW = "invoices"
PAGE = 50


async def one_run(
    base_url: str, upload: UploadFile, args: argparse.Namespace, *, default: bool
) -> tuple[float, float]:
    transport = None if default else httpx.AsyncHTTPTransport()
    async with BemClient(base_url=base_url, api_key=harness.API_KEY, transport=transport) as bem:
        await bem.list_calls(limit=1)  # the pool is open and warm before the clock starts
        ids: list[str] = []
        slots = anyio.Semaphore(args.in_flight)

        async def post(number: int) -> None:
            async with slots:
                call = await bem.invoke_workflow(
                    WORKFLOW, [upload], call_reference_id=f"t-{default}-{number}", batch=False
                )
                ids.append(call.call_id)

        started = time.process_time()
        async with anyio.create_task_group() as tasks:
            for number in range(args.requests):
                tasks.start_soon(post, number)
        posted = time.process_time()
        for start in range(0, len(ids), PAGE):
            await bem.list_calls(CallFilter(call_ids=tuple(ids[start : start + PAGE])), limit=PAGE)
        read = time.process_time()
    pages = -(-len(ids) // PAGE)
    return (posted - started) * 1000 / args.requests, (read - posted) * 1000 / pages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=10)
    args = parser.parse_args(argv)
    configure_logging("warning")
    print("| transport | CPU ms per POST | CPU ms per GET of 50 calls |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bem-transport-") as tmp:
        path = Path(tmp) / "input.txt"
        path.write_bytes(b"x" * 200)
        upload = UploadFile(path=path, input_type="text")
        with harness.emulator(rate=None, burst=100, latency="0.05-0.2") as emu:
            for name, default in (("httpx (httpcore)", False), ("aiohttp (default)", True)):
                run = functools.partial(one_run, emu.base_url, upload, args, default=default)
                per_post, per_get = anyio.run(run)
                print(f"| {name} | {per_post:.2f} | {per_get:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
