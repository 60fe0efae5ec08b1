"""Errors the emulator raises on purpose; each maps to one HTTP answer or a startup failure."""

from __future__ import annotations

from runner.errors import RunnerError


class EmulatorError(RunnerError):
    """The emulator could not be started."""


class RequestRejected(RunnerError):
    """The request was rejected."""

    status_code = 400


class InvalidRequest(RequestRejected):
    """The request is malformed."""


class NotFound(RequestRejected):
    """No such resource."""

    status_code = 404
