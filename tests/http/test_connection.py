"""relay/http/connection.py over real TCP: SDK posts answered by the SdkConnection, other
requests handed to aiohttp, pipelining, chunking, Expect, keep-alive and the 4xx refusals of
malformed requests.

Raw sockets send exact bytes, so the test decides what arrives in which TCP write. The
SdkConnection's answers carry no Server header and aiohttp's do: that tells which answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
from typing import Any

import pytest
from rawhttp import connect, read_response, rest_of

from relay.http import connection
from relay.ingest import segment


async def closed(reader: asyncio.StreamReader) -> bool:
    """True if relay closes the connection (EOF or reset) without sending anything more."""
    return await rest_of(reader) == b""


def track(message_id: str, event: str = "Clicked") -> bytes:
    return json.dumps({"userId": "u1", "event": event, "messageId": message_id}).encode()


def post(body: bytes, *headers: str, path: str = "/v1/track", version: str = "1.1") -> bytes:
    """A POST with a Content-Length body and any extra `Name: value` header lines."""
    lines = [f"POST {path} HTTP/{version}", "Host: relay", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()


def chunked(pieces: list[bytes], *headers: str, path: str = "/v1/track") -> bytes:
    """A POST whose body is sent with Transfer-Encoding: chunked, one chunk per piece."""
    lines = [f"POST {path} HTTP/1.1", "Host: relay", "Content-Type: application/json",
             "Transfer-Encoding: chunked", *headers]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body + b"0\r\n\r\n"


async def only_these_delivered(relay: Any, upstream: Any, ids: list[str]) -> list[str]:
    """Posts one more message on a new connection, waits for it upstream and returns every
    messageId the upstream accepted: the outbox is first in, first out, so anything stored
    before the marker would show up by then."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("marker")))
        assert (await read_response(reader)).status == 200
    await upstream.wait_for(len(ids) + 1)
    return list(upstream.accepted_ids())


@pytest.fixture
async def relay(upstream, write_config, start_relay):
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with start_relay(path) as running:
        yield running


async def test_keep_alive_connection_survives_the_handover(relay, upstream):
    """One keep-alive connection: a post answered by the SdkConnection, a GET handed over to
    aiohttp, then a post that aiohttp answers; both messages reach the upstream."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("ka-1")))
        first = await read_response(reader)
        assert (first.status, first.json()) == (200, {"success": True})
        assert "server" not in first.headers  # the SdkConnection's own answer
        writer.write(get("/healthz"))
        health = await read_response(reader)
        assert (health.status, health.json()) == (200, {"status": "ok"})
        assert "aiohttp" in health.headers["server"]
        writer.write(post(track("ka-2")))
        third = await read_response(reader)
        assert (third.status, third.json()) == (200, {"success": True})
        assert "aiohttp" in third.headers["server"]
    got = await upstream.wait_for(2)
    assert sorted(m["messageId"] for m in got) == ["ka-1", "ka-2"]


async def test_front_answer_headers(relay):
    """The SdkConnection's answer carries Content-Type, Content-Length and Date, and keeps the
    connection open."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("h-1")))
        answer = await read_response(reader)
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/json"
        assert int(answer.headers["content-length"]) == len(answer.body)
        assert answer.headers["date"].endswith(" GMT")
        assert "connection" not in answer.headers
        writer.write(post(track("h-2")))
        assert (await read_response(reader)).status == 200


async def test_three_pipelined_posts(relay, upstream):
    """Three event posts pipelined in one write get three 200s and deliver three messages."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(b"".join(post(track(f"p-{i}")) for i in range(3)))
        answers = [await read_response(reader) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    got = await upstream.wait_for(3)
    assert sorted(m["messageId"] for m in got) == ["p-0", "p-1", "p-2"]


async def test_pipelined_answers_keep_request_order(relay, upstream):
    """Pipelined posts are answered in the order they were sent (a bad body in the middle
    gets its 400 in the middle) and the connection stays usable."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("o-1")) + post(b"not json") + post(track("o-3")))
        answers = [await read_response(reader) for _ in range(3)]
        assert [a.status for a in answers] == [200, 400, 200]
        assert answers[1].json()["code"] == "invalid_json"
        writer.write(post(track("o-4")))
        assert (await read_response(reader)).status == 200
    got = await upstream.wait_for(3)
    assert sorted(m["messageId"] for m in got) == ["o-1", "o-3", "o-4"]


async def test_get_pipelined_behind_a_post_is_refused(relay, upstream):
    """A GET pipelined in the same write behind a post: the post gets 200, the GET 400
    pipelined_request, then the connection closes."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("pl-1")) + get("/healthz"))
        first = await read_response(reader)
        second = await read_response(reader)
        assert first.status == 200
        assert second.status == 400 and second.json()["code"] == "pipelined_request"
        assert second.headers["connection"] == "close"
        assert await closed(reader)
    assert await only_these_delivered(relay, upstream, ["pl-1"]) == ["pl-1", "marker"]


async def send_split(writer: asyncio.StreamWriter, first: bytes, second: bytes) -> None:
    """Sends `first`, waits so that relay reads it on its own, then sends `second`."""
    writer.write(first)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(second)


async def test_get_starting_in_the_chunk_that_ends_a_post_body(relay):
    """A GET whose first byte arrives in the same write as the end of the previous post's body
    is either handed over intact (200 from aiohttp) or refused as pipelined, never garbled."""
    whole = post(track("split-1"))
    cut = len(whole) - 10  # the body's last 10 bytes go in the GET's write
    async with connect(relay.listener.port) as (reader, writer):
        await send_split(writer, whole[:cut], whole[cut:] + get("/healthz"))
        first = await read_response(reader)
        second = await read_response(reader)
    assert first.status == 200
    assert second.body == b'{"status": "ok"}' or second.code() == "pipelined_request", second


async def test_post_body_bytes_are_never_parsed_as_a_request(relay):
    """Bytes inside a post's body are never answered as a request of their own (no request
    smuggling through the handover), however the body is split across writes."""
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n"
    whole = post(b"not json " + smuggled)
    async with connect(relay.listener.port) as (reader, writer):
        await send_split(writer, whole[:-len(smuggled)], smuggled + get("/healthz"))
        first = await read_response(reader)
        second = await read_response(reader)
    assert first.status == 400 and first.json()["code"] == "invalid_json"
    assert second.body == b'{"status": "ok"}' or second.code() == "pipelined_request", second


async def test_handover_of_a_head_sent_in_pieces(relay):
    """A GET whose head arrives in three writes is handed to aiohttp whole and answered 200."""
    request = get("/healthz")
    async with connect(relay.listener.port) as (reader, writer):
        step = len(request) // 3 + 1
        for start in range(0, len(request), step):
            writer.write(request[start:start + step])
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await read_response(reader)
    assert (answer.status, answer.json()) == (200, {"status": "ok"})


HUGE_LENGTH = segment.MAX_REQUEST_BYTES + 100_000
REFUSALS = [
    pytest.param(b"NOT HTTP\r\n\r\n", 400, "invalid_http", id="garbage"),
    pytest.param(b"POST /v1/track HTTP/1.1\r\nHost: relay\r\nX-Bad: a\x7fb\r\n"
                 b"Content-Length: 2\r\n\r\n{}", 400, "invalid_http", id="del-in-header-value"),
    pytest.param(post(b"{}", path="/v1/track?q=" + "a" * 9 * 1024), 414, "uri_too_long",
                 id="9k-url"),
    pytest.param(post(b"{}", *(f"X-H{i}: v" for i in range(150))), 431, "headers_too_large",
                 id="150-headers"),
    pytest.param(post(b"{}", "X-Big: " + "b" * 33 * 1024), 431, "headers_too_large",
                 id="33k-header"),
    # The head only: the answer comes without the body ever being sent.
    pytest.param(post(b"x" * HUGE_LENGTH)[:-HUGE_LENGTH], 413, "request_too_large",
                 id="content-length-over-limit"),
    pytest.param(post(b"x" * HUGE_LENGTH, "Expect: 100-continue")[:-HUGE_LENGTH], 413,
                 "request_too_large", id="expect-100-with-content-length-over-limit"),
]


@pytest.mark.parametrize(("request_bytes", "status", "code"), REFUSALS)
async def test_refusals(relay, upstream, request_bytes, status, code):
    """A malformed or oversized request gets its 4xx JSON {"code","message"} as the very first
    answer, the connection closes, and nothing of it is stored or forwarded."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(request_bytes)
        answer = await read_response(reader)
        assert answer.status == status
        body = answer.json()
        assert body["code"] == code and body["message"]
        assert answer.headers["content-type"] == "application/json"
        assert await closed(reader)
    assert await only_these_delivered(relay, upstream, []) == ["marker"]


async def test_chunked_body_over_the_limit_is_413(relay, upstream):
    """A chunked body passing 500 KiB is answered 413 request_too_large and not stored."""
    size = segment.MAX_REQUEST_BYTES + 1
    head = (b"POST /v1/batch HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n" % size)
    async with connect(relay.listener.port) as (reader, writer):
        # The body's last byte crosses the limit; nothing follows it, so relay has read all
        # that was sent when it closes (no reset to race the answer).
        writer.write(head + b"[" * size)
        answer = await read_response(reader)
        assert answer.status == 413 and answer.json()["code"] == "request_too_large"
        assert await closed(reader)
    assert await only_these_delivered(relay, upstream, []) == ["marker"]


async def test_expect_100_continue(relay, upstream):
    """Expect: 100-continue gets "HTTP/1.1 100 Continue" before the body is sent, then a 200
    once it is."""
    body = track("ex-1")
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(body, "Expect: 100-continue")[:-len(body)])
        interim = await read_response(reader)
        assert interim.status == 100 and interim.body == b""
        writer.write(body)
        answer = await read_response(reader)
        assert answer.status == 200
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["ex-1"]


async def test_connection_close_is_honoured(relay, upstream):
    """A post with Connection: close is answered with Connection: close, then closed."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("cc-1"), "Connection: close"))
        answer = await read_response(reader)
        assert answer.status == 200 and answer.headers["connection"] == "close"
        assert await closed(reader)
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["cc-1"]


async def test_http10_without_keep_alive_closes(relay, upstream):
    """An HTTP/1.0 post without Connection: keep-alive is answered and then closed."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("h10-1"), version="1.0"))
        answer = await read_response(reader)
        assert answer.status == 200
        assert await closed(reader)
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["h10-1"]


async def test_http10_with_keep_alive_stays_open(relay, upstream):
    """An HTTP/1.0 post with Connection: keep-alive is answered with Connection: keep-alive and
    the connection stays open for another."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("k10-1"), "Connection: keep-alive", version="1.0"))
        first = await read_response(reader)
        assert first.status == 200 and first.headers["connection"] == "keep-alive"
        writer.write(post(track("k10-2"), "Connection: keep-alive", version="1.0"))
        assert (await read_response(reader)).status == 200
    got = await upstream.wait_for(2)
    assert sorted(m["messageId"] for m in got) == ["k10-1", "k10-2"]


async def test_chunked_gzip_body(relay, upstream):
    """A gzip-compressed track body sent chunked is accepted and delivered with its event."""
    packed = gzip.compress(track("gz-1", event="Gzipped Chunks"))
    half = len(packed) // 2
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(chunked([packed[:half], packed[half:]], "Content-Encoding: gzip"))
        answer = await read_response(reader)
    assert answer.status == 200
    [message] = await upstream.wait_for(1)
    assert (message["messageId"], message["event"]) == ("gz-1", "Gzipped Chunks")


async def test_body_in_several_writes(relay, upstream):
    """A post whose body arrives in three writes 50 ms apart is answered 200 and delivered."""
    body = track("slow-1")
    request = post(body)
    head, third = len(request) - len(body), len(body) // 3
    async with connect(relay.listener.port) as (reader, writer):
        for start, end in ((0, head + third), (head + third, head + 2 * third),
                           (head + 2 * third, len(request))):
            writer.write(request[start:end])
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await read_response(reader)
    assert answer.status == 200
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["slow-1"]


async def test_cors_default_allows_any_origin(relay):
    """With the default allow_origins ["*"], an event answer carries Allow-Origin: *."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("co-1"), "Origin: https://app.example.com"))
        answer = await read_response(reader)
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == "*"


async def test_cors_listed_origin(upstream, write_config, start_relay):
    """With allow_origins listing an origin, a post from it gets that origin back in
    Allow-Origin with Vary: Origin; a post from another origin gets no Allow-Origin."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        cors={"allow_origins": ["https://app.example.com"]})
    async with start_relay(path) as relay, connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("co-2"), "Origin: https://app.example.com"))
        allowed = await read_response(reader)
        writer.write(post(track("co-3"), "Origin: https://evil.example.com"))
        other = await read_response(reader)
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert allowed.headers["vary"] == "Origin"
    assert other.status == 200
    assert "access-control-allow-origin" not in other.headers
    assert other.headers["vary"] == "Origin"


async def test_many_pipelined_posts(relay, upstream):
    """Twenty posts pipelined in one write (more than the SdkConnection queues before pausing its
    reads) all get their 200 and are delivered, and a handover still works after them."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(b"".join(post(track(f"m-{i}")) for i in range(20)))
        answers = [await read_response(reader) for _ in range(20)]
        assert [a.status for a in answers] == [200] * 20
        writer.write(get("/healthz"))
        assert (await read_response(reader)).status == 200
    got = await upstream.wait_for(20)
    assert sorted(m["messageId"] for m in got) == sorted(f"m-{i}" for i in range(20))


async def test_refusal_pipelined_behind_a_post(relay, upstream):
    """Garbage pipelined behind a good post: the post gets 200 and is delivered, the garbage
    400 invalid_http, then the connection closes."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("rb-1")) + b"NOT HTTP\r\n\r\n")
        first = await read_response(reader)
        second = await read_response(reader)
        assert first.status == 200
        assert second.status == 400 and second.json()["code"] == "invalid_http"
        assert await closed(reader)
    assert await only_these_delivered(relay, upstream, ["rb-1"]) == ["rb-1", "marker"]


async def test_post_behind_connection_close_is_not_stored(relay, upstream):
    """A post pipelined behind a Connection: close post is neither answered nor stored."""
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("ac-1"), "Connection: close") + post(track("ac-2")))
        answer = await read_response(reader)
        assert answer.status == 200 and answer.headers["connection"] == "close"
        assert await closed(reader)
    assert await only_these_delivered(relay, upstream, ["ac-1"]) == ["ac-1", "marker"]


async def test_expect_100_continue_behind_a_pipelined_post(relay):
    """A request with Expect: 100-continue pipelined behind another post gets its 100 Continue
    once the post before it is answered."""
    body = track("exp-2")
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(track("exp-1")) + post(body, "Expect: 100-continue")[:-len(body)])
        assert (await read_response(reader)).status == 200
        interim = await read_response(reader)  # TimeoutError after 5 s: no 100 Continue
        assert interim.status == 100
        writer.write(body)
        assert (await read_response(reader)).status == 200


async def test_a_client_that_does_not_read_its_answers_is_no_longer_read(relay):
    """A client pipelining posts without reading the answers fills its connection's buffers;
    relay then stops reading from it (instead of buffering answers without bound) and, once the
    client reads, answers every request it took."""
    request = post(b"{}", path="/v1/m")  # the SDKs' own metrics: answered without storage
    count = 60_000  # ~9 MB of answers: more than the sockets' buffers hold
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(request * count)
        connections_open = relay.listener.shared.open
        for _ in range(100):
            if any(f.blocked and not f.reading for f in connections_open):
                break
            await asyncio.sleep(0.1)
        assert any(f.blocked and not f.reading for f in connections_open), "relay kept reading"
        answered = 0
        async with asyncio.timeout(60):
            while answered < count:
                answered += (await read_response(reader)).status == 200
        assert answered == count


def send_then_read(port: int, data: bytes) -> bytes:
    """What a blocking HTTP client does (http.client, requests): send the whole request, then
    read the answer; a reset on either side raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("size", [segment.MAX_REQUEST_BYTES + 1, 4 * 1024 * 1024])
async def test_oversized_body_sent_whole_still_reads_413(relay, upstream, size):
    """A client that sends all of an oversized body before reading gets its 413, not a
    connection reset: relay reads and drops what follows a refusal before it closes."""
    request = post(b"[" * size, path="/v1/batch")
    for _ in range(5):  # a reset is a race; five tries made it show every time
        answer = await asyncio.to_thread(send_then_read, relay.listener.port, request)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
        assert b'"request_too_large"' in answer
    assert await only_these_delivered(relay, upstream, []) == ["marker"]


async def open_fronts(relay: Any, want: int) -> int:
    """Waits up to 5 s for relay to hold `want` connections; returns how many it holds."""
    shared = relay.listener.shared
    for _ in range(100):
        if len(shared.open) == want:
            break
        await asyncio.sleep(0.05)
    return len(shared.open)


async def trickle(writer: asyncio.StreamWriter) -> None:
    """Sends a byte every 0.1 s until relay is gone."""
    with contextlib.suppress(ConnectionError):
        for _ in range(100):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("trickling", [False, True], ids=["silent", "trickling"])
async def test_lingering_after_a_refusal_ends(relay, monkeypatch, trickling):
    """After a refusal relay stops waiting for the rest of the body: a silent client is closed
    after LINGER_IDLE, one that keeps sending after LINGER_MOST."""
    monkeypatch.setattr(connection, "LINGER_IDLE", 0.3)
    monkeypatch.setattr(connection, "LINGER_MOST", 1.0)
    async with connect(relay.listener.port) as (reader, writer):
        writer.write(post(b"x" * HUGE_LENGTH)[:-HUGE_LENGTH])
        assert (await read_response(reader)).status == 413
        sender = asyncio.create_task(trickle(writer) if trickling else asyncio.sleep(0))
        assert await open_fronts(relay, 0) == 0
        assert trickling == (not sender.done())
        sender.cancel()
