"""Webhook events in the SQLite store: recorded once by eventID, matched to their calls,
claimed when a call they name is recorded later, expired and purged."""

from __future__ import annotations

from runner.store.base import EventRecorded, WebhookEvent, webhook_event_params
from runner.store.sqlite_plumbing import QUERIES, SqlitePlumbing


class SqliteWebhooks(SqlitePlumbing):
    async def record_webhook_event(
        self, event: WebhookEvent, *, now: float, confirm_at: float
    ) -> EventRecorded:
        """Record ``event`` once (by eventID); mark its call for confirmation by ``confirm_at``.

        An event whose call is not known yet stays pending for :meth:`claim_webhook_events`.
        """
        async with self._transaction("record_webhook_event") as db:
            cursor = await db.execute(
                QUERIES["insert_webhook_event"], webhook_event_params(event, now)
            )
            inserted = cursor.rowcount
            await cursor.close()
            if inserted == 0:
                return EventRecorded(duplicate=True, call_row_id=None, submitted_at=None)
            if event.call_id is None:
                return EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
            async with db.execute(QUERIES["call_row_of_call"], {"call_id": event.call_id}) as c:
                call = await c.fetchone()
            if call is None:
                return EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
            await db.execute(
                QUERIES["match_webhook_event"],
                {"event_id": event.event_id, "call_row_id": call["id"]},
            )
            if call["state"] != "polling":
                return EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
            await db.execute(
                QUERIES["mark_for_confirmation"],
                {"id": call["id"], "now": now, "confirm_at": confirm_at},
            )
            return EventRecorded(
                duplicate=False, call_row_id=int(call["id"]), submitted_at=call["submitted_at"]
            )

    async def claim_webhook_events(
        self,
        call_row_id: int,
        *,
        call_id: str,
        call_reference_id: str,
        now: float,
        confirm_at: float,
    ) -> int:
        """Pending events of a call just recorded (by callID or callReferenceID): marked for
        confirmation by ``confirm_at``. How many there were."""
        async with self._transaction("claim_webhook_events") as db:
            cursor = await db.execute(
                QUERIES["claim_webhook_events"],
                {
                    "call_row_id": call_row_id,
                    "call_id": call_id,
                    "call_reference_id": call_reference_id,
                },
            )
            claimed = cursor.rowcount
            await cursor.close()
            if claimed:
                await db.execute(
                    QUERIES["mark_for_confirmation"],
                    {"id": call_row_id, "now": now, "confirm_at": confirm_at},
                )
        return max(0, claimed)

    async def expire_webhook_events(self, *, received_before: float, purge_before: float) -> int:
        """Pending events older than ``received_before`` are dropped (their calls are not this
        runner's); settled ones older than ``purge_before`` are forgotten. How many dropped."""
        async with self._transaction("expire_webhook_events") as db:
            cursor = await db.execute(QUERIES["expire_webhook_events"], {"before": received_before})
            dropped = cursor.rowcount
            await cursor.close()
            await db.execute(QUERIES["purge_webhook_events"], {"before": purge_before})
        return max(0, dropped)

    async def webhook_event_counts(self) -> dict[str, int]:
        """Recorded events by state: pending, matched, dropped."""
        # on aiosqlite's thread: it reads an index of every event kept
        return {state: count for state, count in await self._fetch("count_webhook_events")}
