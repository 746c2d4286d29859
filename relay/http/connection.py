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
from collections import deque
from typing import cast

import httptools

from relay.http.answers import CONTINUE, FAILED, head
from relay.http.limits import (
    FREE_CHUNKS,
    MAX_BODY_WIRE,
    MAX_HEAD,
    MAX_HEAD_WIRE,
    MAX_HEADERS,
    MAX_URL,
    MIN_CHUNK,
    PIECE,
    VERSIONS,
)
from relay.http.listener_state import Call, Handover, ListenerState, Refusal, Work, header_text
from relay.ingest import segment
from relay.ingest.receiver import Answer
from relay.ingest.segment import Route

log = logging.getLogger("relay.front")

# Requests parsed ahead of their answers (pipelining) before reading pauses.
MAX_QUEUED = 8
# After a refusal the client may still be sending the body: closing with unread bytes makes the
# kernel reset the connection, and a client that sends before it reads (most do) then sees the
# reset instead of the answer. So what follows is read and dropped until the client closes, is
# silent for LINGER_IDLE seconds, or LINGER_MOST seconds have passed.
LINGER_IDLE = 2.0
LINGER_MOST = 10.0


class Fatal(Exception):
    """Stops the parser: what follows on this connection is not parsed here any more."""



class SdkConnection(asyncio.Protocol):
    """One client connection: its requests parsed by llhttp into `queue` (the callbacks below),
    the SDK posts answered in order, anything else handed over to aiohttp; slow clients timed
    out (`sweep`)."""

    def __init__(self, shared: ListenerState) -> None:
        # reading: llhttp's state and the request being parsed
        self.shared = shared
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Work] = deque()
        self.stopped = False  # nothing more is parsed: closing, or handing over
        self.raw: list[bytes] | None = None  # this request's bytes, while its start is known
        self.chunk = b""
        self.between = True  # the parser is between requests
        self.fresh = True  # the current chunk began between requests
        self.expecting = False  # a 100 Continue is owed once the answers before it are out
        self.begun = 0  # requests begun within the current chunk
        self.in_body = False
        self.wire = 0  # bytes fed since the current request's head (or body) began

        self._reset()
        # answering
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
        self.shared.connections.open += 1
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.shared.open.add(self)

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
        self.shared.connections.open -= 1
        self.shared.open.discard(self)
        self.stopped = True
        self._abandon()
        if self.handed is not None:
            self.handed.connection_lost(exc)
        # A worker still storing a request keeps going: the message is committed either way.

    # Answering, in order

    # reading: llhttp's callbacks turn bytes into queued work

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.headed = False  # its head is complete: any further field is a trailer's
        self.http10 = False
        self.route: Route | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.chunks = 0

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self.begun += 1
        # Where this request starts in the byte stream is known only when it starts a chunk
        # (not when the chunk also ends the request before it).
        self.raw = [self.chunk] if self.begun == 1 and self.fresh else None
        self.between = False
        self.wire = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            self._refuse(414, "uri_too_long", f"the request target is over {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if not self.headed:  # a chunked body's trailer is ignored, as aiohttp ignores it
            self.headers.append((name, value))
        if self.head_size > MAX_HEAD or len(self.headers) > MAX_HEADERS:
            self._refuse(431, "headers_too_large",
                         f"request headers are over {MAX_HEAD} bytes or {MAX_HEADERS} fields")

    def on_headers_complete(self) -> None:
        self.headed = True
        version = self.parser.get_http_version()
        if version not in VERSIONS:
            self._refuse(505, "http_version_not_supported",
                         f"HTTP/{version[:8]} is not supported; send HTTP/1.1")
        self.http10 = version == "1.0"
        route = None
        if self.parser.get_method() == b"POST":
            route = self.shared.routes.get(self.url.partition(b"?")[0])
        if route is None or self.parser.should_upgrade():
            self._hand_over()
            return
        self.route = route
        self.shared.enter()  # in flight from now: a stop waits for its body and its answer
        length = self._header(b"content-length")
        if length is not None and length.isdigit() and int(length) > segment.MAX_REQUEST_BYTES:
            self._refuse(413, "request_too_large",
                         f"request body is over {segment.MAX_REQUEST_BYTES} bytes")
        expect = self._header(b"expect")
        if expect is not None and expect.lower() == "100-continue" and not self.http10:
            self.expecting = True
            if not self.queue:
                self._continue()

    def on_chunk_header(self) -> None:
        self.chunks += 1
        if self.chunks > FREE_CHUNKS + self.size // MIN_CHUNK:
            self._refuse(400, "invalid_body",
                         f"the body comes in chunks too small ({self.chunks} for {self.size}"
                         f" bytes); send it whole, or in chunks of {MIN_CHUNK} bytes or more")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > segment.MAX_REQUEST_BYTES:
            self._refuse(413, "request_too_large",
                         f"body is over {segment.MAX_REQUEST_BYTES} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.route is not None
        self.queue.append(Call.of(
            self.route, self.headers, b"".join(self.body), self.parser.should_keep_alive(),
            self.http10))
        self.between, self.in_body, self.raw, self.expecting = True, False, None, False
        self.route = None  # its count goes with the Call
        self._reset()

    def counted(self, size: int) -> None:
        """Counts `size` more bytes fed to the parser against the wire limits of the request
        being read: its head, else its body."""
        if self.stopped or self.between:
            return
        if self.headed and self.route is not None:
            if not self.in_body:
                self.in_body, self.wire = True, 0
                return  # the piece the body began in: part of it was head
            self.wire += size
            if self.wire > MAX_BODY_WIRE:
                self._refusal(413, "request_too_large",
                              f"body is over {MAX_BODY_WIRE} bytes with its chunks' framing")
        elif not self.headed:
            self.wire += size
            if self.wire > MAX_HEAD_WIRE:
                self._refusal(431, "headers_too_large",
                              f"request head is over {MAX_HEAD_WIRE} bytes")

    def _header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return header_text(value)
        return None

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answers once the requests before this one are answered, then closes; stops the
        parser (it must not go on reading what this request left half-done)."""
        self._refusal(status, code, message)
        raise Fatal(code)

    def _refusal(self, status: int, code: str, message: str) -> None:
        self.queue.append(Refusal(Answer.error(status, code, message)))
        self.stopped, self.raw = True, None
        self._abandon()

    def _abandon(self) -> None:
        """The request being received will not be stored: no longer in flight."""
        if self.route is not None:
            self.route = None
            self.shared.leave()

    def _hand_over(self) -> None:
        if self.raw is None:  # pipelined behind another request: its bytes are gone
            self._refuse(400, "pipelined_request",
                         "only event posts may be pipelined; send this on its own connection")
        self.queue.append(Handover())
        self.stopped = True
        raise Fatal("handover")

    # answering: the queue, in order

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
                        answer = await self.shared.answer(item, self.peer)
                    finally:
                        self.queue.popleft()
                        self.shared.leave()
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
            self.shared.leave()
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
        close = not keep_alive or self.shared.stopping
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
        self.handed = self.shared.fallback()
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
            if now - self.since > self.shared.body_seconds:
                self._refusal(408, "body_timeout",
                              f"body not read within {self.shared.body_seconds:g}s")
                self.worker = asyncio.get_running_loop().create_task(self._work())
        elif now - self.since > self.shared.header_seconds:
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
