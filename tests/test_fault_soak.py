"""Every fault of the emulator at once: 5xx, accept-then-500, dropped connections, slow
responses, 429 bursts and a list-visibility lag of seconds. Every file is delivered, no call is
made twice, no request is sent while a ``Retry-After`` forbids it, and once the runner has slowed
down to the account's rate it causes (almost) no 429s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from runner.emulator import Emulator, EmulatorSettings

from .fake_time import fake_clock
from .pipeline import (
    drain,
    leftover_temporaries,
    make_config,
    outbox_documents,
    write_files,
)

pytestmark = pytest.mark.anyio

LAG = 2.0
"""Seconds a new call stays invisible to ``GET /v3/calls``."""
SAMPLE_EVERY = 0.02
"""Fake seconds between two looks at the emulator's counters."""


def hostile_emulator(retry_after_format: Literal["seconds", "http-date"], *, seed: int) -> Emulator:
    return Emulator(
        EmulatorSettings(
            latency_min=0.05,
            latency_max=0.3,
            error_5xx_rate=0.1,
            accept_then_500_rate=0.15,
            drop_rate=0.08,
            slow_rate=0.1,
            slow_seconds=0.3,
            rate_limit_rps=25,
            rate_limit_burst=5,
            retry_after_format=retry_after_format,
            list_visibility_lag=LAG,
            seed=seed,
        )
    )


@dataclass
class Sample:
    requests: int
    rate_limited: int


def sample(stats: dict[str, Any]) -> Sample:
    total = sum(sum(statuses.values()) for statuses in stats["requests"].values())
    return Sample(total, stats["rate_limited"])


async def soak(
    root: Path, emulator: Emulator, *, files: int, visibility_window: float
) -> tuple[dict[str, Any], Sample]:
    """Drain ``files`` files; returns the final stats and the counters half-way through."""
    config = make_config(
        root,
        api={"visibility_window": f"{visibility_window}s", "timeout_seconds": 5},
        # the runner believes it may go four times faster than the account allows; one
        # request at a time, so every request after a 429 is one the runner chose to send
        limits={"requests_per_second": 100, "burst": 10, "max_concurrency": 1},
        poll={"initial_seconds": 0.1, "max_seconds": 0.5},
    )
    write_files(
        config.paths.inbox,
        [(f"wf-{n % 3}/doc-{n}.txt", f"soak document {n}".encode()) for n in range(files)],
    )
    samples: list[Sample] = []
    clock = fake_clock()

    async def keep_sampling() -> None:
        while True:
            samples.append(sample(emulator.stats()))
            await clock.sleep(SAMPLE_EVERY)

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_sampling)
        await drain(config, emulator, clock=clock)
        tg.cancel_scope.cancel()

    documents = outbox_documents(config.paths.outbox)
    assert len(documents) == files
    assert {kind for kind, _ in documents.values()} == {"result"}
    assert leftover_temporaries(config.paths.outbox) == []
    stats = emulator.stats()
    # the sample nearest to the half of all requests: what came after is the adapted runner
    half = sample(stats).requests / 2
    return stats, min(samples, key=lambda taken: abs(taken.requests - half))


@pytest.mark.parametrize(("retry_after_format", "files"), [("seconds", 30), ("http-date", 12)])
async def test_all_faults_at_once_with_a_safe_visibility_window(
    tmp_path: Path, retry_after_format: Literal["seconds", "http-date"], files: int
) -> None:
    emulator = hostile_emulator(retry_after_format, seed=3)

    stats, halfway = await soak(tmp_path, emulator, files=files, visibility_window=3 * LAG)

    assert all(n == 1 for n in stats["calls_by_reference"].values())
    assert all(n == 1 for n in stats["files_by_content_sha256"].values())
    assert len(stats["files_by_content_sha256"]) == files
    # the faults really happened (all kinds, given enough requests)
    kinds = ("error_5xx", "accept_then_500", "dropped") if files >= 30 else ()
    assert all(stats["faults"][kind] > 0 for kind in kinds), stats["faults"]
    assert stats["rate_limited"] > 0
    # the runner never sent a request before a Retry-After it had been given elapsed
    assert stats["requests_before_retry_after"] == 0
    # after adapting, 429s are rare: under 1 in 10 requests in the second half of the run
    end = sample(stats)
    second_half_requests = end.requests - halfway.requests
    second_half_429 = end.rate_limited - halfway.rate_limited
    assert second_half_requests > 0
    assert second_half_429 / second_half_requests < 0.1


async def test_a_visibility_window_shorter_than_the_lag_can_duplicate_calls(
    tmp_path: Path,
) -> None:
    """Why ``api.visibility_window`` must exceed bem's listing lag: with a shorter window a call
    accepted-then-500 is "not found" before it shows up and is sent again. Every file still gets
    exactly one document (the oldest call is adopted), but bem did the work twice."""
    emulator = Emulator(
        EmulatorSettings(
            latency_min=0.05, latency_max=0.1, accept_then_500_rate=1.0, list_visibility_lag=1.0
        )
    )

    stats, _ = await soak(tmp_path, emulator, files=3, visibility_window=0.2)

    assert max(stats["calls_by_reference"].values()) > 1
