"""One rate budget for every runner of a PostgreSQL store, timed by the database's clock.

A take is one single-row ``UPDATE ... RETURNING``: runners taking at once queue on the row, so
no token is ever granted twice, and no host's clock is read. Runners take a few tokens at a
time and spend them locally, so a request costs a fraction of a round trip. A 429 seen by any
runner pauses all of them until its ``Retry-After`` and halves the rate they share (down to
:data:`MIN_RATE_FACTOR`); the rate comes back linearly over :data:`RECOVERY_SECONDS`.
"""

from __future__ import annotations

import math

from runner.store.base import Tokens
from runner.store.postgres_plumbing import QUERIES, PostgresPlumbing

MIN_RATE_FACTOR = 0.1
RECOVERY_SECONDS = 30.0


def tokens_taken(*, want: int, granted: int, left: float, rate: float, paused_for: float) -> Tokens:
    """What a take gave, and when the next token is there if not all were granted."""
    if granted >= want:
        return Tokens(granted, 0.0)
    if paused_for > 0 or rate <= 0:
        return Tokens(granted, paused_for + (1.0 / rate if rate > 0 else math.inf))
    return Tokens(granted, max(0.0, (1.0 - left) / rate))


class PostgresBudget(PostgresPlumbing):
    async def take_tokens(self, want: int, *, rate: float, burst: float) -> Tokens:
        params = {"want": want, "rate": rate, "burst": burst, "recovery": RECOVERY_SECONDS}
        async with self._transaction("take_tokens") as conn:
            cursor = await conn.execute(QUERIES["take_tokens"], params)
            row = await cursor.fetchone()
        assert row is not None, "the rate_bucket row is made by the schema"
        granted, left, factor, paused_for = int(row[0]), float(row[1]), float(row[2]), row[3]
        return tokens_taken(
            want=want, granted=granted, left=left, rate=rate * factor, paused_for=float(paused_for)
        )

    async def pause_sending(self, seconds: float) -> None:
        async with self._transaction("pause_sending") as conn:
            await conn.execute(
                QUERIES["pause_sending"], {"seconds": max(seconds, 0.0), "floor": MIN_RATE_FACTOR}
            )
