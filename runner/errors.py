"""Every error bem-runner raises on purpose.

One root, so a caller can catch "anything the runner meant to raise" in one place; lower-layer
errors (httpx, sqlite3, OS) are mapped at the boundary that meets them, ``raise ... from exc``.

    RunnerError
    ├── ConfigError                 bad config file, flag or environment; exit code 2
    ├── StoreError                  the state database cannot be opened or is not ours
    │   ├── StateInUseError         another process owns the state
    │   ├── ClaimLostError          this runner no longer holds the work it is writing (fenced)
    │   └── StoreUnavailableError   a shared store cannot be reached now (may come back)
    └── ApiError                    anything that went wrong talking to bem
        ├── AuthError               401/403: the key is rejected; a loud stop, not a failed file
        ├── PermanentError          400/404/409/422: asking again will not help
        │   └── NotFoundError       404
        ├── TransientError          connection errors, timeouts, 408, 429, 5xx on a read
        │   └── RateLimitedError    429, with ``retry_after``
        └── OutcomeUnknownError     a POST that may or may not have created a call

The docstring of each class is its default message.
"""

from __future__ import annotations


class RunnerError(Exception):
    """bem-runner error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or "")

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(RunnerError):
    """Invalid configuration."""


class StoreError(RunnerError):
    """The state database cannot be used."""


class StateInUseError(StoreError):
    """The state is in use by another bem-runner process."""


class ClaimLostError(StoreError):
    """This runner's claim was taken by another runner: it must stop touching that work."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached or dropped the connection; nothing was written."""


class ApiError(RunnerError):
    """The bem API request failed."""

    def __init__(self, message: str | None = None, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthError(ApiError):
    """bem rejected the API key."""


class PermanentError(ApiError):
    """bem rejected the request; sending it again will not help."""


class NotFoundError(PermanentError):
    """bem has no such resource."""


class TransientError(ApiError):
    """bem could not be reached or answered with a temporary failure."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """bem's rate limit was hit."""


class OutcomeUnknownError(ApiError):
    """The request was sent but its outcome is unknown: a call may or may not have been created."""
