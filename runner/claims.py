"""Work another runner took over: a write fenced off by the store is dropped, quietly.

On a store shared by several runners every write to a group checks that this runner still holds
its claim (:class:`~runner.errors.ClaimLostError` otherwise). Losing one is no fault: this runner
was slow or silent past its lease, and whoever holds the work now finishes it — a call whose
outcome this runner knew is found again by listing its ``callReferenceID``, never sent twice.
So the work is dropped with an ``info`` line: no error document, no retry, no resend.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from runner.errors import ClaimLostError

log = structlog.get_logger("runner.claims")


@contextmanager
def unless_claim_lost(action: str, **fields: object) -> Iterator[None]:
    """Run the block; a :class:`ClaimLostError` from it is logged at ``info`` and swallowed."""
    try:
        yield
    except ClaimLostError as exc:
        log.info(
            "claim lost; another runner has this work", action=action, reason=exc.message, **fields
        )
