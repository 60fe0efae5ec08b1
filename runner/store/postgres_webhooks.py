"""Webhook events in the PostgreSQL store: recorded once, matched to their calls.

The call row is locked while an event is matched or a bem call claims its pending events, so an
event arriving while its call is being recorded is never missed by both.
"""

from __future__ import annotations

from runner.store.base import EventRecorded, WebhookEvent, webhook_event_params
from runner.store.postgres_plumbing import QUERIES, PostgresPlumbing


class PostgresWebhooks(PostgresPlumbing):
    async def record_webhook_event(
        self, event: WebhookEvent, *, now: float, confirm_at: float
    ) -> EventRecorded:
        """Record ``event`` once (by eventID); mark its call for confirmation by ``confirm_at``."""
        nothing = EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
        async with self._transaction("record_webhook_event") as conn:
            cursor = await conn.execute(
                QUERIES["insert_webhook_event"], webhook_event_params(event, now)
            )
            if cursor.rowcount == 0:
                return EventRecorded(duplicate=True, call_row_id=None, submitted_at=None)
            if event.call_id is None:
                return nothing
            cursor = await conn.execute(QUERIES["call_row_of_call"], {"call_id": event.call_id})
            call = await cursor.fetchone()
            if call is None:
                return nothing
            call_row_id, state, submitted_at = call
            await conn.execute(
                QUERIES["match_webhook_event"],
                {"event_id": event.event_id, "call_row_id": call_row_id},
            )
            if state != "polling":
                return nothing
            await conn.execute(
                QUERIES["mark_for_confirmation"],
                {"id": call_row_id, "now": now, "confirm_at": confirm_at},
            )
            return EventRecorded(
                duplicate=False, call_row_id=int(call_row_id), submitted_at=submitted_at
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
        """Pending events of a call just recorded: marked for confirmation by ``confirm_at``."""
        async with self._transaction("claim_webhook_events") as conn:
            await conn.execute(QUERIES["lock_call"], {"call_row_id": call_row_id})
            cursor = await conn.execute(
                QUERIES["claim_webhook_events"],
                {
                    "call_row_id": call_row_id,
                    "call_id": call_id,
                    "call_reference_id": call_reference_id,
                },
            )
            claimed = cursor.rowcount
            if claimed:
                await conn.execute(
                    QUERIES["mark_for_confirmation"],
                    {"id": call_row_id, "now": now, "confirm_at": confirm_at},
                )
        return max(0, claimed)

    async def expire_webhook_events(self, *, received_before: float, purge_before: float) -> int:
        async with self._transaction("expire_webhook_events") as conn:
            cursor = await conn.execute(
                QUERIES["expire_webhook_events"], {"before": received_before}
            )
            dropped = cursor.rowcount
            await conn.execute(QUERIES["purge_webhook_events"], {"before": purge_before})
        return max(0, dropped)

    async def webhook_event_counts(self) -> dict[str, int]:
        rows = await self._fetch("count_webhook_events")
        return {str(row["state"]): int(row["count"]) for row in rows}
