"""Hostile bytes against relay's HTTP port: each defect an outsider found, shown fixed on a
running relay (in-process, on 127.0.0.1, with raw sockets for exact bytes)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sqlite3
import time
import tracemalloc
from typing import Any

import aiohttp
import pytest
from fakes import free_port
from rawhttp import connect, read_response, rest_of

from relay.http import connection, limits
from relay.ingest import segment
from relay.outbox.store import Outbox

ORIGIN = "https://www.example.com"
# The bytes: an Origin whose trailing U+3000 str.strip() removed, so that relay once
# echoed it into a head it could not encode.
BAD_ORIGIN_POST = (b"POST /v1/t HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                   b"Origin: https://www.example.com\xe3\x80\x80\r\n\r\n{}")


def track(message_id: str, **extra: Any) -> bytes:
    return json.dumps({"userId": "u1", "event": "E", "messageId": message_id, **extra}).encode()


def post(body: bytes, *headers: str, path: str = "/v1/track", version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: relay", f"Content-Length: {len(body)}",
             *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def chunked_head(*headers: str, path: str = "/v1/track") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: relay", "Transfer-Encoding: chunked", *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n"


def rows(db: str) -> list[tuple[str, str]]:
    """Every stored message: (user_key, body)."""
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT user_key, body FROM outbox ORDER BY id"))


def counters(db: str) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT name, count FROM counters").fetchall())


@pytest.fixture
def relay_with(upstream, write_config, start_relay):
    """Starts relay with extra top-level config keys; use as `async with relay_with(...)`."""

    def start(deliver: bool = True, **overrides: Any) -> Any:
        # Without delivery the vendor is a port nobody listens on: what is stored stays stored.
        url = upstream.url if deliver else f"http://127.0.0.1:{free_port()}"
        return start_relay(write_config([{"name": "seg", "kind": "segment", "url": url}],
                                        **overrides))

    return start


async def settled(relay: Any, seconds: float = 3.0) -> None:
    """Waits until no request is in flight in relay's Fronts and no connection is open."""
    shared = relay.listener.shared
    for _ in range(int(seconds / 0.02)):
        if not (shared.inflight or shared.connections.open):
            return
        await asyncio.sleep(0.02)


# 1. An Origin header can never stall a connection


async def test_an_origin_that_is_not_byte_for_byte_allowed_is_not_echoed_nor_a_stall(
        relay_with):
    """The issue's Origin (an allowed one plus U+3000) and a second ordinary post in one
    connection both get 200, the first without allow-origin; nothing stays in flight."""
    async with relay_with(cors={"allow_origins": [ORIGIN]}) as relay:
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(BAD_ORIGIN_POST)
            await asyncio.sleep(0.1)
            writer.write(post(b'{"userId": "u", "event": "E"}', f"Origin: {ORIGIN}",
                              path="/v1/t"))
            first, second = await read_response(reader), await read_response(reader)
        assert (first.status, second.status) == (200, 200)
        assert "access-control-allow-origin" not in first.headers
        assert first.headers["vary"] == "Origin"
        assert second.headers["access-control-allow-origin"] == ORIGIN
        await settled(relay)
        assert relay.listener.shared.inflight == 0
        async with aiohttp.ClientSession() as http:
            sent = {"Origin": "https://www.example.com\u2028"}
            async with http.options(relay.url + "/v1/t", headers=sent) as resp:
                assert "Access-Control-Allow-Origin" not in resp.headers


async def test_a_fault_while_answering_is_a_500_logged_once_and_frees_the_connection(
        relay_with, upstream, monkeypatch, caplog):
    """When answering a post raises (an answer's head that cannot be encoded), the client gets
    500 at once, one log line says so, the connection closes, and neither it nor the post
    pipelined behind stays counted: a stop does not wait for them."""
    real_head = connection.head
    calls = {"n": 0}

    def failing_head(answer: Any, connection: bytes, second: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            "\u3000".encode("latin-1")  # what the unvalidated Origin did
        return real_head(answer, connection, second)

    monkeypatch.setattr(connection, "head", failing_head)
    caplog.set_level(logging.ERROR, logger="relay.front")
    async with relay_with() as relay:
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(post(track("f-1")) + post(track("f-2")))
            answer = await read_response(reader)
            assert answer.status == 500 and answer.code() == "internal_error"
            assert await rest_of(reader) == b""  # closed after it
        await settled(relay)
        shared = relay.listener.shared
        assert shared.inflight == 0 and shared.idle.is_set()
        assert shared.connections.open == 0
        faults = [r for r in caplog.records if "cannot answer a request" in r.getMessage()]
        assert len(faults) == 1
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(post(track("f-3")))
            assert (await read_response(reader)).status == 200
    # The post whose answer failed was stored; the one behind it never was.
    assert sorted(m["messageId"] for m in await upstream.wait_for(2)) == ["f-1", "f-3"]


async def test_thirty_such_connections_neither_linger_nor_fill_the_connection_cap(relay_with):
    """30 connections sending the issue's bytes (cap 30) are each answered twice, then closed
    by the header timeout like any idle connection; a new client is then served, not 503."""
    limits = {"max_connections": 30, "header_seconds": 1, "body_seconds": 1}
    async with relay_with(cors={"allow_origins": [ORIGIN]}, limits=limits) as relay:
        streams = [await asyncio.open_connection("127.0.0.1", relay.listener.port)
                   for _ in range(30)]
        for _, writer in streams:
            writer.write(BAD_ORIGIN_POST + post(track("again")))
        for reader, _ in streams:
            assert [(await read_response(reader)).status for _ in range(2)] == [200, 200]
        started = time.monotonic()
        for reader, _ in streams:
            assert await rest_of(reader) == b""
        assert time.monotonic() - started < 3.0
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(post(track("new")))
            assert (await read_response(reader)).status == 200
        for _, writer in streams:
            writer.close()


# 2. No message is stored bigger than 32 KB, however it was assembled


async def test_a_shared_context_cannot_make_a_message_over_32_kb(relay_with):
    """A 394-byte gzip body whose batch context of 250,000 bytes would be merged into each of
    200 tiny items is refused 413 before anything is stored (it once stored 49 MB)."""
    body = json.dumps({"context": {"pad": "A" * 250_000},
                       "batch": [{"type": "track", "userId": "u", "event": "E"}] * 200}).encode()
    zipped = gzip.compress(body, 9)
    assert len(zipped) < 600
    async with relay_with() as relay, aiohttp.ClientSession() as http:
        async with http.post(relay.url + "/v1/batch", data=zipped,
                             headers={"Content-Encoding": "gzip"}) as resp:
            assert resp.status == 413
            assert (await resp.json())["code"] == "message_too_large"
        assert rows(relay.config.storage.path) == []


async def test_a_shared_context_cannot_multiply_a_request_past_its_budget(relay_with):
    """A context just under 32 KB merged into 200 items (each message under the limit, 6 MB
    in all) is refused 413 request_too_large: a request stores at most 16x its size + 64 KB."""
    body = {"context": {"pad": "A" * 30_000},
            "batch": [{"type": "track", "userId": "u", "event": "E"}] * 200}
    async with relay_with() as relay, aiohttp.ClientSession() as http:
        async with http.post(relay.url + "/v1/batch", json=body) as resp:
            assert resp.status == 413
            assert (await resp.json())["code"] == "request_too_large"
        assert rows(relay.config.storage.path) == []


async def test_the_limit_is_on_the_message_as_stored(relay_with):
    """A message of 22 KB as sent that is 66 KB once stored (ASCII JSON escapes é as \\u00e9)
    is refused 413; one of 32 KB as stored is accepted and stored as sent."""
    async with relay_with(deliver=False) as relay, aiohttp.ClientSession() as http:
        wide = {"userId": "u", "event": "E", "properties": {"p": "é" * 11_000}}
        async with http.post(relay.url + "/v1/track", data=json.dumps(wide, ensure_ascii=False)
                             .encode()) as resp:
            assert resp.status == 413 and (await resp.json())["code"] == "message_too_large"
        fits = {"userId": "u", "event": "E", "messageId": "fits", "properties": {"p": "x"}}
        room = segment.MAX_MESSAGE_BYTES - 400
        fits["properties"] = {"p": "x" * room}
        async with http.post(relay.url + "/v1/track", json=fits) as resp:
            assert resp.status == 200
        [(_, stored)] = rows(relay.config.storage.path)
        assert len(stored) <= segment.MAX_MESSAGE_BYTES
        assert json.loads(stored)["properties"]["p"] == "x" * room


async def test_what_the_rules_grow_past_the_limits_is_not_stored(relay_with):
    """A user's 20 KB group id injected by one_group_per_user: a 15 KB track of theirs (35 KB
    once injected) and, in a batch of tiny tracks, those past the request's budget are not
    stored but counted; the rest are stored and the request is answered 200."""
    rules = [{"type": "one_group_per_user"}]
    group = "g" * 20_000
    async with relay_with(deliver=False, rules=rules) as relay, aiohttp.ClientSession() as http:
        db = relay.config.storage.path
        async with http.post(relay.url + "/v1/group",
                             json={"userId": "big", "groupId": group}) as resp:
            assert resp.status == 200
        batch = {"batch": [
            {"type": "track", "userId": "big", "event": "Wide", "properties": {"p": "w" * 15_000}},
            {"type": "track", "userId": "small", "event": "Small"}]}
        async with http.post(relay.url + "/v1/batch", json=batch) as resp:
            assert resp.status == 200
        events = [json.loads(body).get("event") for _, body in rows(db)]
        assert events == [None, "Small"]  # the group call, then the small track alone
        assert counters(db)["invalid.message_too_large_after_rules"] == 1
        tiny = {"batch": [{"type": "track", "userId": "big", "event": "T"}] * 300}
        size = len(json.dumps(tiny))
        async with http.post(relay.url + "/v1/batch", json=tiny) as resp:
            assert resp.status == 200
        kept = [body for _, body in rows(db) if json.loads(body).get("event") == "T"]
        assert 0 < len(kept) < 300
        assert sum(map(len, kept)) <= segment.Budget(size).limit
        assert counters(db)["invalid.request_too_large_after_rules"] == 300 - len(kept)


async def test_a_batch_is_read_by_bytes_not_by_rows_then_trimmed(tmp_path):
    """With 500 messages of 30 KB queued, reading a batch of at most 100 KB reads three of
    them (and about that much), not 500 rows (15 MB) to trim afterwards."""
    outbox = Outbox(str(tmp_path / "relay.db"), ["seg"], "normal")
    await outbox.open()
    try:
        body = json.dumps({"type": "track", "userId": "u", "event": "E",
                           "properties": {"p": "x" * 30_000}})
        await outbox.put("k", [("u", body)] * 500, {})
        tracemalloc.start()
        batch = await outbox.next_batch("seg", 500, 100_000, by_key=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(batch) == 3
        assert peak < 1_000_000, f"{peak} bytes allocated to read 3 messages"
        single = await outbox.next_batch("seg", 500, 1024, by_key=False)
        assert len(single) == 1  # one message over the budget is still read, alone
    finally:
        await outbox.close()


# 5. Trailers are not headers


async def test_fields_in_a_chunked_bodys_trailer_are_ignored(relay_with, upstream):
    """Authorization, Content-Encoding, Origin and X-Forwarded-For sent only in a trailer
    change nothing: no key is read from it, no decoding, no allow-origin, no client address."""
    settings = {"write_keys": ["KEY-1"], "cors": {"allow_origins": [ORIGIN]},
                "trusted_proxies": ["127.0.0.1"]}
    body = json.dumps({"userId": "u", "event": "E", "messageId": "trailer"}).encode()
    chunks = b"%x\r\n%s\r\n0\r\n" % (len(body), body)
    auth = "Authorization: Basic S0VZLTE6"  # KEY-1:
    async with relay_with(**settings) as relay:
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(chunked_head() + chunks + auth.encode() + b"\r\n\r\n")
            assert (await read_response(reader)).status == 401
        trailer = (f"Content-Encoding: gzip\r\nOrigin: {ORIGIN}\r\n"
                   "X-Forwarded-For: 203.0.113.9\r\n").encode()
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(chunked_head(auth, path="/v1/t") + chunks + trailer + b"\r\n")
            answer = await read_response(reader)
        assert answer.status == 200, answer.body
        assert "access-control-allow-origin" not in answer.headers
    [message] = await upstream.wait_for(1)
    assert message["messageId"] == "trailer"
    assert message["context"]["ip"] == "127.0.0.1"


# 7. The smaller ones


async def test_http_10_is_never_sent_100_continue(relay_with):
    """An HTTP/1.0 post with Expect: 100-continue gets its answer, not an interim 100 first."""
    async with relay_with() as relay, connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("h10"), "Expect: 100-continue", version="1.0"))
        first = await reader.readline()
        assert first.startswith(b"HTTP/1.1 200"), first


@pytest.mark.parametrize("request_bytes", [
    post(track("v2"), version="2.0"),
    b"GET /healthz HTTP/2.0\r\nHost: relay\r\n\r\n",
    b"POST /v1/track\r\n\r\n",
    b"GET /healthz\r\n\r\n",
], ids=["post-2.0", "get-2.0", "post-0.9", "get-0.9"])
async def test_http_versions_other_than_1_x_get_505(relay_with, request_bytes):
    """HTTP/0.9 and HTTP/2.0 request lines, for relay's routes or aiohttp's, get 505 with
    {"code","message"} (never an answer that claims HTTP/2.0) and the connection closes."""
    async with relay_with() as relay, connect(relay.listener.port) as (reader, writer):
        writer.write(request_bytes)
        answer = await read_response(reader)
        assert answer.status == 505 and answer.code() == "http_version_not_supported"
        assert await rest_of(reader) == b""
    assert rows(relay.config.storage.path) == []


async def test_chunks_too_small_or_extensions_too_long_are_refused(relay_with):
    """A body in 1-byte chunks is refused 400 once it passes 16 chunks more than one per
    256 bytes; chunk extensions, which no callback sees, count against the body's bytes on the
    wire (413); a body in chunks of 300 bytes is accepted."""
    body = track("small-chunks", properties={"p": "x" * 3000})
    async with relay_with(deliver=False) as relay:
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(chunked_head() + b"".join(b"1\r\n%s\r\n" % body[i:i + 1]
                                                   for i in range(200)))
            answer = await read_response(reader)
            assert answer.status == 400 and answer.code() == "invalid_body"
            assert "chunks too small" in answer.json()["message"]
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(chunked_head() + b"2;" + b"e" * (2 * limits.MAX_BODY_WIRE))
            answer = await read_response(reader)
            assert answer.status == 413 and answer.code() == "request_too_large"
        pieces = [body[i:i + 300] for i in range(0, len(body), 300)]
        async with connect(relay.listener.port) as (reader, writer):
            writer.write(chunked_head() + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
                         + b"0\r\n\r\n")
            assert (await read_response(reader)).status == 200
    assert len(rows(relay.config.storage.path)) == 1


async def test_an_endless_header_value_is_cut_off_at_the_heads_limit(relay_with):
    """One header value sent on and on (httptools keeps it whole until it ends) is refused 431
    once the head passes its bytes on the wire, instead of growing in memory until the header
    timeout."""
    async with relay_with() as relay, connect(relay.listener.port) as (reader, writer):
        writer.write(b"POST /v1/track HTTP/1.1\r\nHost: relay\r\nX-Big: ")
        for _ in range(4 * limits.MAX_HEAD_WIRE // 65536):
            writer.write(b"a" * 65536)
            await writer.drain()
        answer = await read_response(reader)
        assert answer.status == 431 and answer.code() == "headers_too_large"


async def test_admin_listen_moves_readiness_metrics_and_admin_off_the_public_port(
        relay_with, tmp_path):
    """With admin.listen set, /readyz, /metrics and /admin/* answer there and 404 at listen;
    /healthz answers at both."""
    token = "t" * 20
    admin = {"token": token, "listen": f"127.0.0.1:{free_port()}"}
    async with relay_with(admin=admin) as relay, aiohttp.ClientSession() as http:
        inside = f"http://127.0.0.1:{relay.listener.admin_port}"
        bearer = {"Authorization": f"Bearer {token}"}
        for path in ("/readyz", "/metrics", "/admin/queue"):
            async with http.get(inside + path, headers=bearer) as resp:
                assert resp.status == 200, path
            async with http.get(relay.url + path, headers=bearer) as resp:
                assert resp.status == 404, path
        for base in (inside, relay.url):
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
