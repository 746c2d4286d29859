"""One client connection: SDK posts parsed by llhttp and answered here; the rest to aiohttp.

aiohttp's request handling costs ~130 µs of CPU per request on the machines relay is measured
on; a bare llhttp protocol ~20 µs (bench/profile.md). SDK posts to the event routes are nearly
all of relay's traffic, so they are parsed and answered here. Any other request (health,
metrics, admin, CORS preflights, the CDN routes, unknown paths) hands the connection over to
aiohttp, which from then on owns it: it is given the request's bytes from its first one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import httptools

from relay.http.answers import CONTINUE, FAILED, head
from relay.http.listener_state import Call, Door, Handover, Refusal
from relay.http.parser import PIECE, Intake
from relay.ingest.receiver import Answer

log = logging.getLogger("relay.front")

# Requests parsed ahead of their answers (pipelining) before reading pauses.
MAX_QUEUED = 8
# After a refusal the client may still be sending the body: closing with unread bytes makes the
# kernel reset the connection, and a client that sends before it reads (most do) then sees the
# reset instead of the answer. So what follows is read and dropped until the client closes, is
# silent for LINGER_IDLE seconds, or LINGER_MOST seconds have passed.
LINGER_IDLE = 2.0
LINGER_MOST = 10.0


class Front(Intake, asyncio.Protocol):
    """Answers the SDK posts `Intake` parsed, in order, and hands anything else over to aiohttp;
    times out slow clients (`sweep`)."""

    def __init__(self, door: Door) -> None:
        super().__init__(door)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.handed: asyncio.Protocol | None = None
        self.worker: asyncio.Task[None] | None = None
        self.reading = True
        self.blocked = False  # the client is not taking its answers (the write buffer is full)
        self.since = time.monotonic()  # when the current wait (head or body) began
        self.eof = False
        self.lingering = 0.0  # when a refusal's lingering close began; 0 when not lingering

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.door.connections.open += 1
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.door.open.add(self)

    def data_received(self, data: bytes) -> None:
        if self.handed is not None:
            _pass_on(self.handed, data)
            return
        if len(data) <= PIECE:  # nearly every read
            self._feed(data)
        else:
            for start in range(0, len(data), PIECE):
                if self.stopped:
                    self._feed(data[start:])  # kept for aiohttp, or dropped: not parsed
                    break
                self._feed(data[start:start + PIECE])
        if self.queue and self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())
        self._flow()

    def _feed(self, data: bytes) -> None:
        """Parses one piece of the stream (or keeps it for aiohttp, or drops it, once parsing
        has stopped), counting it against the current request's limits."""
        if self.stopped:
            if self.raw is not None:
                self.raw.append(data)  # for aiohttp, once the answers before it are out
            elif self.lingering:
                self.since = time.monotonic()
            return
        self.chunk, self.begun, self.fresh = data, 0, self.between
        if self.raw is not None:
            self.raw.append(data)
        was_body = self.in_body
        self._parse(data)
        if not self.between:  # a request is still being read: count what it took of the wire
            self.counted(len(data))
            if self.in_body and not was_body:
                self.since = time.monotonic()

    def _parse(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self.stopped:  # a fault of relay's own, not of the request
                log.exception("front: cannot handle a request from %s", self.peer)
                self._refusal(500, "internal_error", "relay could not handle this request")
        except httptools.HttpParserError as exc:
            self._refusal(400, "invalid_http", f"cannot parse the request: {exc}")

    def eof_received(self) -> bool | None:
        if self.handed is not None:
            return self.handed.eof_received()
        # Half-closed by the client: what it sent is still answered, then the connection closes.
        self.eof = True
        return self.worker is not None and not self.lingering

    def pause_writing(self) -> None:
        if self.handed is not None:
            self.handed.pause_writing()
            return
        self.blocked = True
        self._flow()

    def resume_writing(self) -> None:
        if self.handed is not None:
            self.handed.resume_writing()
            return
        self.blocked = False
        self._flow()

    def _flow(self) -> None:
        """Reads only while fewer than MAX_QUEUED requests wait for their answers, the client
        takes the answers it is sent and no handover waits for them: one that pipelines without
        reading, or sends on behind a request for aiohttp, must not grow relay's buffers."""
        handover = self.stopped and self.raw is not None
        wanted = bool(self.lingering) or (
            len(self.queue) < MAX_QUEUED and not self.blocked and not handover)
        if self.transport is None or wanted == self.reading or self.handed is not None:
            return
        self.reading = wanted
        if wanted:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.connections.open -= 1
        self.door.open.discard(self)
        self.stopped = True
        self._abandon()
        if self.handed is not None:
            self.handed.connection_lost(exc)
        # A worker still storing a request keeps going: the message is committed either way.

    # Answering, in order

    async def _work(self) -> None:
        """Answers the queued work in order; the connection's only task while it has work. A
        fault of relay's own while answering one request is answered 500 and logged once; the
        connection then closes, and no request of it stays counted in flight."""
        try:
            while self.queue:
                item = self.queue[0]
                if isinstance(item, Handover):
                    self._give_to_aiohttp()
                    return
                if isinstance(item, Refusal):
                    self._linger(item.answer)
                    return
                try:
                    # The call leaves the queue and the count in flight whatever happens: a
                    # worker cancelled at a stop must not leave it counted.
                    try:
                        answer = await self.door.answer(item, self.peer)
                    finally:
                        self.queue.popleft()
                        self.door.leave()
                    self._write(answer, item.keep_alive, item.http10)
                except Exception:
                    log.exception("front: cannot answer a request from %s; answered 500 and"
                                  " closed", self.peer)
                    self._fail()
                    return
                if self.expecting and not self.queue:
                    self._continue()
                self._flow()
        finally:
            self.worker = None
            self.since = time.monotonic()
            if self.queue:
                self._release()
            if self.eof and self.transport is not None and self.handed is None:
                self.transport.close()

    def _release(self) -> None:
        """Once the worker stops, what is left queued is never answered: after a refusal or a
        handover nothing, after a fault or a cancelled worker the calls behind it. None of them
        stays counted in flight, and a connection that leaves calls unanswered is closed."""
        calls = sum(isinstance(item, Call) for item in self.queue)
        self.queue.clear()
        for _ in range(calls):
            self.door.leave()
        if calls:
            self._fail()

    def _fail(self) -> None:
        """Answers 500 (a head that needs no encoding) and closes."""
        self.stopped = True
        self._abandon()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(FAILED)
            transport.close()

    def _continue(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CONTINUE)
        self.expecting = False

    def _write(self, answer: Answer, keep_alive: bool, http10: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        close = not keep_alive or self.door.stopping
        connection = b"close" if close else b"keep-alive" if http10 else b""
        transport.write(head(answer, connection, int(time.time())) + answer.body)
        if close:
            self.stopped = True
            transport.close()

    def _linger(self, answer: Answer) -> None:
        """Sends a refusal and half-closes; the rest of the request is read and dropped."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(head(answer, b"close", int(time.time())) + answer.body)
        if self.eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.lingering = time.monotonic()
        self._flow()

    def _give_to_aiohttp(self) -> None:
        transport, raw = self.transport, self.raw
        assert transport is not None and raw is not None
        self.handed = self.door.fallback()
        self.queue.clear()
        if not self.reading:
            transport.resume_reading()  # aiohttp's own flow control takes over
        self.handed.connection_made(transport)
        self.raw = None
        for data in raw:
            _pass_on(self.handed, data)

    # Timeouts

    def sweep(self, now: float) -> None:
        """Called about four times a second: closes a connection whose request head (or next
        request, after an answer) takes over header_seconds, or whose body takes over
        body_seconds (408), whatever its queue holds; while relay answers (a worker runs), the
        client's clock starts again once the answers are out."""
        transport = self.transport
        if self.handed is not None or transport is None or transport.is_closing():
            return
        if self.lingering:
            if now - self.since > LINGER_IDLE or now - self.lingering > LINGER_MOST:
                transport.close()
            return
        if self.worker is not None:
            return
        if self.queue:  # work that no worker answers: never left so, but never kept open either
            log.error("front: a connection from %s had work and no worker; closed", self.peer)
            self._fail()
            self._release()
            return
        if self.stopped:
            transport.close()
        elif self.in_body:
            if now - self.since > self.door.body_seconds:
                self._refusal(408, "body_timeout",
                              f"body not read within {self.door.body_seconds:g}s")
                self.worker = asyncio.get_running_loop().create_task(self._work())
        elif now - self.since > self.door.header_seconds:
            self.stopped = True
            transport.close()

    def close(self) -> None:
        """Closes the connection unless aiohttp owns it or an answer is on its way."""
        if self.handed is None and self.worker is None and self.transport is not None:
            self.transport.close()


def _pass_on(handed: asyncio.Protocol, data: bytes) -> None:
    """Gives aiohttp `data` in pieces of at most PIECE bytes, as a transport would: what it
    echoes of a request it cannot parse is bounded by what it was given at once."""
    if len(data) <= PIECE:
        handed.data_received(data)
        return
    for start in range(0, len(data), PIECE):
        handed.data_received(data[start:start + PIECE])
