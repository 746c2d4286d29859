"""What the connections of one listener share, and the work a connection queues in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.http.admission import Connections
from relay.http.client_address import Proxies
from relay.http.cors import Cors
from relay.ingest import segment
from relay.ingest.receiver import Answer, Ingest
from relay.ingest.segment import Route

if TYPE_CHECKING:
    from relay.http.connection import SdkConnection

# What an event post's answer depends on, besides its route and body.
_CALL_HEADERS = frozenset({b"content-encoding", b"authorization", b"origin", b"x-forwarded-for"})


@dataclass
class ListenerState:
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
        self.routes = {r.path.encode(): r for r in segment.routes()}
        self.open: set[SdkConnection] = set()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def held(self) -> tuple[int, int]:
        """Connections open, and the bytes their requests hold in relay: bodies being read or
        waiting for their answer, bytes kept for aiohttp (for /metrics, and the tests that
        bound them)."""
        held = 0
        for connection in self.open:
            held += connection.size + sum(map(len, connection.raw or ()))
            held += sum(len(item.body) for item in connection.queue if isinstance(item, Call))
        return self.connections.open, held

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()

    async def answer(self, call: Call, peer: str | None) -> Answer:
        """Stores the post's messages (or refuses them) and says what to answer."""
        remote = peer
        if self.proxies.networks:
            remote = self.proxies.client_of(peer, call.forwarded)
        answer = await self.ingest().answer(call.route, call.body, call.encoding,
                                            call.authorization, remote)
        if self.cors is not None:
            answer = answer.with_headers(self.cors.headers_for(call.origin))
        return answer


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

    @classmethod
    def of(cls, route: Route, headers: list[tuple[bytes, bytes]], body: bytes,
           keep_alive: bool, http10: bool) -> Call:
        """The call of a parsed request: of its headers, only those its answer depends on."""
        found: dict[bytes, str] = {}
        forwarded: list[str] = []
        for key, value in headers:  # one pass over them, not one per header asked for
            name = key.lower()
            if name in _CALL_HEADERS:
                text = header_text(value)
                if name == b"x-forwarded-for":
                    forwarded.append(text)
                else:
                    found.setdefault(name, text)
        return cls(route, body, found.get(b"content-encoding", ""), found.get(b"authorization"),
                   found.get(b"origin"), forwarded, keep_alive, http10)


@dataclass
class Refusal:
    """A request refused before its body was read whole; the connection closes after it."""

    answer: Answer


@dataclass
class Handover:
    """The connection goes to aiohttp from this request on."""


Work = Call | Refusal | Handover


def header_text(value: bytes) -> str:
    """A header's value as text, undecodable bytes kept as they are, as aiohttp reads them."""
    return value.decode("utf-8", "surrogateescape")
