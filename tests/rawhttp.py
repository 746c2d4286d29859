"""HTTP/1.1 over a raw socket for the front's tests: exact bytes out, answers parsed back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Response:
    """One HTTP/1.x answer as read off the socket; header names in lower case."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def code(self) -> str | None:
        """The `code` of a JSON error body; None for any other body."""
        try:
            value = self.json()
        except ValueError:
            return None
        return value.get("code") if isinstance(value, dict) else None


async def read_response(reader: asyncio.StreamReader, after: str = "") -> Response:
    """Reads one answer: status line, headers, then a Content-Length body (none if absent);
    `after` says what came before, for the message when no status line arrives."""
    async with asyncio.timeout(5):
        status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1."), f"got {status_line!r} {after}"
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(int(status_line.split()[1]), headers, body)


async def rest_of(reader: asyncio.StreamReader) -> bytes:
    """Everything relay sends until it closes the connection (a reset counts as a close)."""
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    except ConnectionResetError:
        return b""


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Stream]:
    """A raw TCP connection to relay, with Nagle off so that each write leaves on its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
