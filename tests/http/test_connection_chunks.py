"""relay/http/connection.py's answers on one keep-alive connection do not depend on how the byte
stream
is cut into TCP writes (property-based, with hypothesis).

A short sequence of requests (event posts of several kinds, and at most one GET /healthz, last)
is sent as one byte stream, cut at hypothesis-chosen points, each piece written on its own
after a short pause so that relay reads it as a chunk of its own. The (status, code) answers
must be the ones the requests alone call for, and every valid message must reach the fake
upstream. The only answer allowed to depend on the cuts is the GET's: refused 400
pipelined_request when its first byte shares a write with bytes of the request before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from rawhttp import Response, connect, read_response, rest_of

POSTS = ("track", "batch", "bad_json", "chunked", "gzip")
BAD_BODIES = (b"not json", b"{", b'{"userId": "u1", "event":', b"\xff\xfe{}", b"[1, 2")
OK = (200, None)
INVALID_JSON = (400, "invalid_json")
PIPELINED = (400, "pipelined_request")


@dataclass
class Request:
    """One request of the stream: its bytes, the answer it calls for, the ids it carries."""

    kind: str
    data: bytes
    expected: tuple[int, str | None]
    ids: list[str] = field(default_factory=list)


def message(message_id: str) -> dict[str, Any]:
    return {"type": "track", "userId": "u1", "event": "Chunked", "messageId": message_id}


def post(body: bytes, *headers: str, path: str = "/v1/track") -> bytes:
    """A keep-alive POST with a Content-Length body and any extra `Name: value` lines."""
    lines = [f"POST {path} HTTP/1.1", "Host: relay", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def chunked_post(body: bytes, pieces: int, path: str) -> bytes:
    """A POST whose body goes in `pieces` chunks of Transfer-Encoding: chunked."""
    step = -(-len(body) // pieces)
    parts = [body[i:i + step] for i in range(0, len(body), step)]
    head = "\r\n".join([f"POST {path} HTTP/1.1", "Host: relay",
                        "Content-Type: application/json", "Transfer-Encoding: chunked"])
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return head.encode() + b"\r\n\r\n" + encoded + b"0\r\n\r\n"


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"


def build(kinds: list[tuple[str, int]], nonce: str) -> list[Request]:
    """The requests for `kinds` ((kind, parameter) pairs); messageIds begin with `nonce`."""
    out: list[Request] = []
    for index, (kind, n) in enumerate(kinds):
        ids = [f"{nonce}-{index}-{j}" for j in range(n if kind in ("batch", "chunked") else 1)]
        if kind == "track":
            out.append(Request(kind, post(json.dumps(message(ids[0])).encode()), OK, ids))
        elif kind == "batch":
            body = json.dumps({"batch": [message(i) for i in ids]}).encode()
            out.append(Request(kind, post(body, path="/v1/batch"), OK, ids))
        elif kind == "bad_json":
            out.append(Request(kind, post(BAD_BODIES[n % len(BAD_BODIES)]), INVALID_JSON))
        elif kind == "chunked":
            body = json.dumps({"batch": [message(i) for i in ids]}).encode()
            out.append(Request(kind, chunked_post(body, n, "/v1/batch"), OK, ids))
        elif kind == "gzip":
            packed = gzip.compress(json.dumps(message(ids[0])).encode(), mtime=0)
            out.append(Request(kind, post(packed, "Content-Encoding: gzip"), OK, ids))
        else:
            assert kind == "healthz"
            out.append(Request(kind, HEALTHZ, OK))
    return out


def cut_positions(requests: list[Request], cuts: list[tuple[int, int]]) -> list[int]:
    """Where the stream is cut: each cut is (request index, offset from that request's start),
    both taken modulo the stream's length; a cut at 0 is none."""
    starts, total = [], 0
    for request in requests:
        starts.append(total)
        total += len(request.data)
    positions = {(starts[index % len(starts)] + offset) % total for index, offset in cuts}
    return sorted(p for p in positions if p)


def pieces_of(stream: bytes, positions: list[int]) -> list[bytes]:
    bounds = [0, *positions, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def get_shares_a_write(requests: list[Request], positions: list[int]) -> bool:
    """True if the (last) GET's first byte is written together with bytes of the request
    before it, i.e. no cut falls exactly where the GET begins."""
    if len(requests) < 2 or requests[-1].kind != "healthz":
        return False
    start = sum(len(r.data) for r in requests[:-1])
    return start not in positions


async def delivered(upstream: Any, ids: set[str], seconds: float = 10.0) -> set[str]:
    """Waits until every id of `ids` was accepted upstream; returns all ids accepted so far."""
    deadline = time.monotonic() + seconds
    while not ids <= (got := set(upstream.accepted_ids())):
        assert time.monotonic() < deadline, f"never delivered: {sorted(ids - got)}"
        await asyncio.sleep(0.01)
    return got


@pytest.fixture
async def relay(upstream, write_config, start_relay):
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with start_relay(path) as running:
        yield running


class Sent(set[str]):
    """Every messageId sent by the examples of one test (they share one relay and upstream)."""

    def __repr__(self) -> str:
        return f"<{len(self)} messageIds sent>"


@pytest.fixture
def sent() -> Sent:
    """A fresh record of the messageIds sent."""
    return Sent()


post_kinds = st.tuples(st.sampled_from(POSTS), st.integers(1, 3))
# 1-6 requests: up to five posts, then the GET two times in three (always after no post).
sequences = st.tuples(st.lists(post_kinds, max_size=5), st.integers(0, 2)).map(
    lambda t: t[0] + [("healthz", 0)] if t[1] or not t[0] else t[0])
offsets = st.one_of(st.just(0), st.integers(-3, 3), st.integers(-400, 400))
cut_lists = st.lists(st.tuples(st.integers(0, 5), offsets), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=sequences, cuts=cut_lists, pause_ms=st.integers(5, 20))
# The GET begins a write of its own: it must be handed over, never refused.
@example(kinds=[("track", 1), ("healthz", 0)], cuts=[(1, 0)], pause_ms=5)
# The GET's write begins with the last byte of the post before it: refused (or answered).
@example(kinds=[("track", 1), ("healthz", 0)], cuts=[(1, -1)], pause_ms=5)
# The GET's write begins with the final CRLF of a chunked post.
@example(kinds=[("chunked", 2), ("healthz", 0)], cuts=[(1, -2)], pause_ms=5)
# A gzip post, bad JSON and a batch cut inside heads and bodies, the GET on its own.
@example(kinds=[("gzip", 1), ("bad_json", 2), ("batch", 3), ("healthz", 0)],
         cuts=[(0, 20), (1, 3), (1, 70), (2, -1), (3, 0), (3, 5)], pause_ms=5)
async def test_answers_do_not_depend_on_the_cuts(relay, upstream, sent, *, kinds, cuts,
                                                 pause_ms):
    """However one keep-alive stream of requests is cut into writes, relay gives the answers
    the requests call for, never a 5xx, and delivers every valid message upstream."""
    requests = build(kinds, uuid.uuid4().hex[:12])
    stream = b"".join(r.data for r in requests)
    positions = cut_positions(requests, cuts)
    shared = get_shares_a_write(requests, positions)
    event(f"{len(positions) + 1} writes")
    if requests[-1].kind == "healthz":
        event(f"GET {'shares a write' if shared else 'starts a write'}")
        start = len(stream) - len(HEALTHZ)
        last = max((p for p in positions if p <= start), default=0)
        if len(requests) > 1 and start - len(requests[-2].data) < last < start:
            event("GET's write begins inside the request before it")
    ids = {i for r in requests for i in r.ids}
    sent |= ids  # before sending: a message may be delivered even if the answers are wrong
    answers: list[Response] = []
    async with connect(relay.listener.port) as (reader, writer):
        for piece in pieces_of(stream, positions):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause_ms / 1000)
        for _ in requests:
            answers.append(await read_response(
                reader, f"after {[(r.status, r.code()) for r in answers]}"))
        with contextlib.suppress(ConnectionError):
            writer.write_eof()  # nothing more comes: relay (or aiohttp) closes its side too
        extra = await rest_of(reader)
    got = [(a.status, a.code()) for a in answers]
    assert all(status < 500 for status, _ in got), got
    expected = [r.expected for r in requests]
    if shared and got[-1] == PIPELINED:
        expected[-1] = PIPELINED
        event("GET refused as pipelined")
        assert answers[-1].headers.get("connection") == "close"
    assert got == expected, (got, expected, positions)
    assert extra == b"", extra
    if requests[-1].kind == "healthz" and got[-1] == OK:
        assert json.loads(answers[-1].body) == {"status": "ok"}
    accepted = await delivered(upstream, ids)
    assert accepted <= sent, f"unknown ids delivered: {sorted(accepted - sent)}"
