"""A stand-in for systemd's notification socket: a real unix datagram socket tests read."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio


class NotifyListener:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        """What ``NOTIFY_SOCKET`` holds."""
        self.seen: list[dict[str, str]] = []

    async def receive(self) -> dict[str, str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.seen.append(message)
            return message

    async def until(self, key: str, value: str | None = None) -> dict[str, str]:
        """Read messages until one carries ``key`` (with ``value``, if given)."""
        while True:
            message = await self.receive()
            if key in message and (value is None or message[key] == value):
                return message

    def pending(self) -> list[dict[str, str]]:
        """Messages already queued, without waiting."""
        messages: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return messages
            messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


@contextmanager
def notify_listener(*, abstract: bool = False) -> Iterator[NotifyListener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    with tempfile.TemporaryDirectory(prefix="bem-notify-") as directory:
        if abstract:
            name = Path(directory).name
            sock.bind(b"\0" + name.encode())
            address = f"@{name}"
        else:
            address = str(Path(directory) / "notify")
            sock.bind(address)
        try:
            yield NotifyListener(sock, address)
        finally:
            sock.close()
