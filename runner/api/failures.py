"""What an HTTP answer or a transport failure means, as a :mod:`runner.errors` class.

The retry rule for reads is the official SDK's (``_should_retry`` in ``bem/_base_client.py``):
``x-should-retry: true`` / ``false`` decides when present; otherwise 408, 409, 429 and every
5xx are retried. The wait is ``retry-after-ms`` (preferred) or ``Retry-After`` on any answer.

A POST that creates calls is never retried blindly: an answer that may follow a created call
(5xx, and 409 — a conflict or a lock timeout on a call that may exist) is an
:class:`OutcomeUnknownError`, resolved by listing calls by their reference.

Messages name where the request went (``POST http://host/v3/...``, never the query string or
user info) and never carry a header value: the text of a transport error is kept only for
the errors known to describe the connection, not the request.
"""

from __future__ import annotations

import json
import math
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx

from runner.errors import (
    ApiError,
    AuthError,
    ConfigError,
    NotFoundError,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = [
    "Redactor",
    "parse_retry_after",
    "retry_after_seconds",
    "should_retry",
    "should_retry_header",
    "status_error",
    "target",
    "text_is_safe",
    "transport_error",
]

MESSAGE_MAX_CHARS = 500
MAYBE_CREATED = "; a call may have been created"

# Transport errors whose text describes the connection (an OS error, a timeout, what the server
# sent) and never the request's own headers. Any other (LocalProtocolError: "Illegal header
# value b'...'") is reported by its class name only.
_TEXT_IS_SAFE: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.TimeoutException,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
)
_NEVER_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.LocalProtocolError,
)


# -- where ---------------------------------------------------------------------------------------


def target(request: httpx.Request) -> str:
    """``METHOD scheme://host[:port]/path``: where a request went, without query or user info."""
    url = request.url
    path = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    return f"{request.method} {url.scheme}://{url.netloc.decode('ascii', 'replace')}{path}"


# -- retry headers -------------------------------------------------------------------------------


def should_retry_header(headers: httpx.Headers) -> bool | None:
    """``x-should-retry``: True for "true", False for "false", else None (as the SDK reads it)."""
    value = headers.get("x-should-retry")
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def should_retry(response: httpx.Response) -> bool:
    """The SDK's rule: may this answer to a read be retried?"""
    header = should_retry_header(response.headers)
    if header is not None:
        return header
    status = response.status_code
    return status in (408, 409, 429) or status >= 500


def retry_after_seconds(headers: httpx.Headers, *, now: float) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, else ``Retry-After``, else None."""
    millis = _finite(headers.get("retry-after-ms"))
    if millis is not None and millis >= 0:
        return millis / 1000
    return parse_retry_after(headers.get("retry-after"), now=now)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    ``now`` is the current wall-clock time (Unix seconds) an HTTP date is measured from.
    Returns ``None`` for a missing or unreadable header; never a negative number.
    """
    if value is None:
        return None
    text = value.strip()
    seconds = _finite(text)
    if seconds is None:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _finite(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# -- status answers ------------------------------------------------------------------------------


def status_error(
    status: int,
    *,
    creates: bool,
    message: str,
    should_retry: bool | None = None,
    retry_after: float | None = None,
) -> ApiError:
    """The error for a non-2xx answer; ``creates``: the request may have created calls."""
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        return AuthError(message, status_code=status)
    if creates:
        return _write_error(status, message, should_retry, retry_after)
    return _read_error(status, message, should_retry, retry_after)


def _read_error(
    status: int, message: str, should_retry: bool | None, retry_after: float | None
) -> ApiError:
    if should_retry is False:
        return _final(status, f"{message} (x-should-retry: false)")
    if status == httpx.codes.TOO_MANY_REQUESTS:
        return RateLimitedError(message, status_code=status, retry_after=retry_after)
    if should_retry or status in (408, 409) or status >= 500:
        return TransientError(message, status_code=status, retry_after=retry_after)
    return _final(status, message)


def _write_error(
    status: int, message: str, should_retry: bool | None, retry_after: float | None
) -> ApiError:
    if status >= 500 or status == httpx.codes.CONFLICT:
        return OutcomeUnknownError(message + MAYBE_CREATED, status_code=status)
    if should_retry is False:
        return _final(status, f"{message} (x-should-retry: false)")
    if status == httpx.codes.TOO_MANY_REQUESTS:
        return RateLimitedError(message, status_code=status, retry_after=retry_after)
    if should_retry or status == httpx.codes.REQUEST_TIMEOUT:
        return TransientError(message, status_code=status, retry_after=retry_after)
    return _final(status, message)


def _final(status: int, message: str) -> ApiError:
    if status == httpx.codes.NOT_FOUND:
        return NotFoundError(message, status_code=status)
    return PermanentError(message, status_code=status)


def error_detail(content: bytes) -> str:
    """bem's ``error`` message, or the start of whatever else the body holds."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])[:MESSAGE_MAX_CHARS]
    return content[:MESSAGE_MAX_CHARS].decode("utf-8", "replace").strip()


# -- transport failures --------------------------------------------------------------------------


def transport_error(
    exc: Exception, *, where: str, creates: bool, redactor: Redactor
) -> ApiError | ConfigError:
    """The error for a request that got no answer; its text only when it cannot hold headers."""
    name = type(exc).__name__
    detail = redactor.redact(str(exc)) if text_is_safe(exc) else ""
    message = f"{where}: {name}: {detail}" if detail else f"{where}: {name}"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return ConfigError(f"bem base URL: {message}")
    if isinstance(exc, _NEVER_SENT) or not creates:
        return TransientError(message)
    return OutcomeUnknownError(message + MAYBE_CREATED)


def text_is_safe(exc: Exception) -> bool:
    """Whether a transport error's text describes the connection, never the request's headers."""
    return isinstance(exc, (*_TEXT_IS_SAFE, OSError))


class Redactor:
    """Removes a secret from text, in every form a message may show it in (as is, or repr'd)."""

    def __init__(self, secret: str) -> None:
        forms = {secret, repr(secret)[1:-1], repr(secret.encode("utf-8", "replace"))[2:-1]}
        # The longest first, so a form that contains another is removed whole.
        self._forms = sorted((form for form in forms if form), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "[redacted]")
        return text
