"""Admission of new connections: counted against limits.max_connections, refused beyond it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

log = logging.getLogger("relay")

# What a connection beyond limits.max_connections is answered, before it is closed.
_BUSY_BODY = b'{"code": "too_many_connections", "message": "relay is at its connection limit"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (len(_BUSY_BODY), _BUSY_BODY))
# How long a refused connection stays open, its bytes discarded, for its client to read BUSY.
BUSY_SECONDS = 1.0


class Refused(asyncio.Protocol):
    """A connection over the cap: answered BUSY at once (clients read it once their request is
    written), its bytes discarded unparsed; closed when the client closes, or BUSY_SECONDS on."""

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass
        writer.write(BUSY)
        self.timer = asyncio.get_running_loop().call_later(BUSY_SECONDS, writer.close)

    def eof_received(self) -> bool:
        return False  # asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class Connections:
    """Counts open connections; beyond `limit`, new ones get a Refused protocol instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0

    def protocol(self, make: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        if self.open >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("relay: %d connection(s) open, the limit; %d refused so far",
                            self.open, self.refused)
            return Refused()
        return make()  # it counts itself in `open` while connected
