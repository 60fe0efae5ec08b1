"""The systemd notification protocol (``sd_notify``) without libsystemd.

systemd hands a service a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, the watchdog interval in ``WATCHDOG_USEC``. Each
message is one datagram of ``KEY=value`` lines. Outside systemd there is no socket and every
call is a no-op, so the daemon never has to ask whether it runs under systemd.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from types import TracebackType

import msgspec
import structlog

log = structlog.get_logger("runner.notify")

STATUS_MAX = 200
USEC_PER_SECOND = 1_000_000
NSEC_PER_USEC = 1_000
"""``systemctl status`` shows one line; longer texts only cost bytes."""


class NotifySettings(msgspec.Struct, frozen=True):
    """What systemd told the process through its environment."""

    socket: str | None = None
    watchdog_usec: int | None = None

    @property
    def watchdog_every(self) -> float | None:
        """Seconds between watchdog pings: half the interval, as sd_watchdog_enabled(3) asks."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / (2 * USEC_PER_SECOND)


def notify_settings(environ: Mapping[str, str], *, pid: int) -> NotifySettings:
    """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (for this ``pid`` only)."""
    address = environ.get("NOTIFY_SOCKET") or None
    watchdog = _positive_int(environ.get("WATCHDOG_USEC"))
    watchdog_pid = _positive_int(environ.get("WATCHDOG_PID"))
    if watchdog_pid is not None and watchdog_pid != pid:
        watchdog = None  # the watchdog is meant for another process (e.g. our parent)
    return NotifySettings(socket=address, watchdog_usec=watchdog)


def _positive_int(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    number = int(value)
    return number if number > 0 else None


class Notifier:
    """Sends state changes to systemd; ``with Notifier(settings) as n:`` opens the socket."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self._last_status: str | None = None

    def __enter__(self) -> Notifier:
        if self.settings.socket is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def ready(self, status: str | None = None) -> None:
        self._send(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """``STATUS=``; repeated identical texts are sent once."""
        if text != self._last_status:
            self._send(STATUS=text)

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, as systemd compares it)."""
        self._send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // NSEC_PER_USEC))

    def stopping(self, *, needs: float | None = None, status: str | None = None) -> None:
        """``STOPPING=1``; ``needs`` seconds more than the stop timeout asks for an extension."""
        self._send(STOPPING="1", STATUS=status, EXTEND_TIMEOUT_USEC=_usec(needs))

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd to wait ``seconds`` longer from now before it gives up on us."""
        self._send(EXTEND_TIMEOUT_USEC=_usec(seconds))

    def watchdog(self, now: float) -> bool:
        """Ping the watchdog if half its interval has passed since the last ping.

        Called only from the supervisor's loop, so a loop that stops turning stops the pings
        and systemd restarts the service.
        """
        every = self.settings.watchdog_every
        if every is None or self._sock is None:
            return False
        if self._last_ping is not None and now - self._last_ping < every:
            return False
        self._last_ping = now
        self._send(WATCHDOG="1")
        return True

    def _send(self, **fields: str | None) -> None:
        if self._sock is None or self.settings.socket is None:
            return
        lines = [f"{key}={value}" for key, value in fields.items() if value is not None]
        if "STATUS" in fields and fields["STATUS"] is not None:
            self._last_status = fields["STATUS"]
        try:
            self._sock.sendto("\n".join(lines).encode(), _address(self.settings.socket))
        except OSError as exc:
            # systemd not listening (e.g. NotifyAccess=none) must never stop the pipeline.
            log.warning("cannot notify systemd", error=str(exc), message=lines[0])


def _address(socket_path: str) -> str | bytes:
    if socket_path.startswith("@"):
        return b"\0" + socket_path[1:].encode()
    return socket_path


def _usec(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return str(max(1, round(seconds * USEC_PER_SECOND)))


def status_line(files: Mapping[str, int], open_calls: int, *, mode: str) -> str:
    """The one-line ``STATUS=``: what is queued, in flight and finished."""
    queued = files.get("queued", 0)
    results = sum(n for state, n in files.items() if state.endswith(":result"))
    errors = sum(n for state, n in files.items() if state.endswith(":error"))
    line = f"{mode}: {queued} queued, {open_calls} calls open, {results} results, {errors} errors"
    return line[:STATUS_MAX]
