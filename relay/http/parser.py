"""The reading half of a client connection: llhttp's callbacks turn bytes into queued work.

A `Call` for each complete SDK post, a `Refusal` for a request refused before its body was read
whole, a `Handover` for anything aiohttp answers instead. `Front` answers the queue in order.
"""

from __future__ import annotations

from collections import deque

import httptools

from relay.http.listener_state import Call, Door, Handover, Refusal, Work
from relay.ingest import segment
from relay.ingest.receiver import Answer
from relay.ingest.segment import Route

MAX_URL = 8 * 1024
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
# llhttp is fed at most this much at a time, so that what the limits below count is never off by
# more than one piece (and aiohttp, after a handover, is given pieces no bigger).
PIECE = 64 * 1024
# httptools gathers a header's value until it ends before passing it on, so MAX_HEAD alone would
# let one endless value grow in memory: the bytes a head takes on the wire are bounded too.
MAX_HEAD_WIRE = MAX_URL + MAX_HEAD + PIECE + 4 * 1024
# A body's bytes on the wire: the body itself, its chunks' framing and extensions (which llhttp
# skips without a callback), and at most one piece of what follows it.
MAX_BODY_WIRE = segment.MAX_REQUEST_BYTES + 2 * PIECE
# Each chunk costs three calls into Python; a body in 1-byte chunks would cost ~20,000 times a
# plain body's CPU. Beyond FREE_CHUNKS, chunks must carry MIN_CHUNK bytes each on average.
FREE_CHUNKS = 16
MIN_CHUNK = 256
VERSIONS = ("1.0", "1.1")


class Fatal(Exception):
    """Stops the parser: what follows on this connection is not parsed here any more."""


class Intake:
    """Parses requests with llhttp into `queue`; the connection's answering side is a subclass."""

    def __init__(self, door: Door) -> None:
        self.door = door
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

    def _continue(self) -> None:
        """Sends the 100 Continue owed (the answering side knows the transport)."""
        raise NotImplementedError

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
            route = self.door.routes.get(self.url.partition(b"?")[0])
        if route is None or self.parser.should_upgrade():
            self._hand_over()
            return
        self.route = route
        self.door.enter()  # in flight from now: a stop waits for its body and its answer
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
                return value.decode("utf-8", "surrogateescape")  # as aiohttp does
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
            self.door.leave()

    def _hand_over(self) -> None:
        if self.raw is None:  # pipelined behind another request: its bytes are gone
            self._refuse(400, "pipelined_request",
                         "only event posts may be pipelined; send this on its own connection")
        self.queue.append(Handover())
        self.stopped = True
        raise Fatal("handover")

