"""What bem told the runner about the account as a whole, and the one policy every stage follows.

A rejected key (401/403) is a loud stop, not one failed file per request: nothing more is sent
except one probe every :data:`AUTH_RETRY_SECONDS` (``run``), and ``drain`` exits 3. bem that
cannot be reached at all (no HTTP answer) starts the ``api.unreachable_timeout`` clock of a
drain. Any answer from bem that is not about the key clears both.
"""

from __future__ import annotations

import msgspec
import structlog

from runner.errors import ApiError, AuthError, TransientError

log = structlog.get_logger("runner.health")

AUTH_RETRY_SECONDS = 60.0
"""While bem rejects the key, one request (a probe) this often, not one per file."""


class ApiHealth(msgspec.Struct):
    auth_error: str | None = None
    unreachable_since: float | None = None
    last_error: str | None = None

    def reached(self) -> None:
        """bem answered, and not about the key."""
        self.auth_error = None
        self.unreachable_since = None

    def failed(self, exc: ApiError, *, now: float) -> bool:
        """Record what a failed request says about the account; whether it said anything (the
        key was rejected or bem could not be reached), so the supervisor should look."""
        if isinstance(exc, AuthError):
            self.auth_error = exc.message
            return True
        if isinstance(exc, TransientError) and exc.status_code is None:
            if self.unreachable_since is None:
                self.unreachable_since = now
            self.last_error = exc.message
            return True
        return False

    def unreachable_for(self, now: float) -> float:
        """Seconds bem has been unreachable (0 while it answers)."""
        return 0.0 if self.unreachable_since is None else now - self.unreachable_since


class StoreHealth(msgspec.Struct):
    """Whether a shared store (PostgreSQL) answers. While it does not, nothing is claimed, so
    nothing is sent; every task tries again on its own, and ``drain`` gives up (exit 3) after
    ``api.unreachable_timeout``, as for bem. Told once when it goes and once when it is back."""

    unavailable_since: float | None = None
    last_error: str | None = None

    def failed(self, error: str, *, now: float) -> None:
        if self.unavailable_since is None:
            self.unavailable_since = now
            log.warning(
                "the store cannot be reached; nothing is sent until it is back", error=error
            )
        self.last_error = error

    def reached(self) -> None:
        if self.unavailable_since is not None:
            log.info("the store is reachable again")
        self.unavailable_since = None

    def unavailable_for(self, now: float) -> float:
        return 0.0 if self.unavailable_since is None else now - self.unavailable_since
