"""A bem-compatible API server for tests, benchmarks and trying the runner without an account.

In-process through ``httpx.ASGITransport(app=Emulator().app)``, over loopback HTTP with
:func:`serve_emulator`, or as ``bem-runner emulator``.
"""

from runner.emulator.emulator import Emulator
from runner.emulator.errors import EmulatorError
from runner.emulator.server import serve_emulator
from runner.emulator.settings import EmulatorSettings

__all__ = ["Emulator", "EmulatorError", "EmulatorSettings", "serve_emulator"]
