"""What the connections of one listener share, and the work a connection queues in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay import protocol
from relay.address import Proxies
from relay.admission import Connections
from relay.cors import Cors
from relay.ingest import Answer, Ingest
from relay.protocol import Route

if TYPE_CHECKING:
    from relay.front import Front


@dataclass
class Door:
    """What every connection of one listener shares."""

    ingest: Callable[[], Ingest]  # the current Ingest (rules are replaced on reload)
    fallback: Callable[[], asyncio.Protocol]  # aiohttp's protocol for one connection
    cors: Cors | None
    proxies: Proxies
    header_seconds: float
    body_seconds: float
    connections: Connections
    stopping: bool = False

    def __post_init__(self) -> None:
        self.routes = {r.path.encode(): r for r in protocol.routes()}
        self.open: set[Front] = set()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()


@dataclass
class Call:
    """One complete SDK post, waiting for its answer."""

    route: Route
    body: bytes
    encoding: str
    authorization: str | None
    origin: str | None
    forwarded: list[str]
    keep_alive: bool
    http10: bool  # keep-alive must then be said in the answer


@dataclass
class Refusal:
    """A request refused before its body was read whole; the connection closes after it."""

    answer: Answer


@dataclass
class Handover:
    """The connection goes to aiohttp from this request on."""


Work = Call | Refusal | Handover
