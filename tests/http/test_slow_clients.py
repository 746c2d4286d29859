"""Slow and greedy clients against `relay serve` as a real process: slowloris headers, bodies that
never finish and more connections than `limits.max_connections` are cut off by `limits`, while
other clients still get their 200 promptly."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream, free_port
from processes import AUTH, RelayProcess

HEADER_SECONDS = 2.0
BODY_SECONDS = 3.0
SLOWLORIS = b"POST /v1/track HTTP/1.1\r\nHost: relay\r\nX-Pad: " + b"a" * 10_000
BODY_HEAD = (b"POST /v1/batch HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100000\r\n\r\n{\"batch\": [")
PROMPT = 1.0  # seconds an ordinary request may take while the slow ones hang


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    """RelayProcess objects to kill at teardown, whatever state they are in."""
    made: list[RelayProcess] = []
    yield made
    for process in made:
        process.ensure_dead()


async def start(write_config: Callable[..., Path], upstream: FakeUpstream,
                processes: list[RelayProcess], tmp_path: Path, **limits: Any) -> RelayProcess:
    """`relay serve` on a free port with `limits` (over the test's header and body seconds)."""
    port = free_port()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        listen=f"127.0.0.1:{port}",
                        limits={"header_seconds": HEADER_SECONDS, "body_seconds": BODY_SECONDS,
                                **limits})
    relay = RelayProcess(path, port, tmp_path / f"relay-{len(processes)}.log")
    processes.append(relay)
    relay.spawn()
    await relay.wait_ready()
    return relay


async def trickle(port: int, head: bytes, tail: bytes, opened: asyncio.Event | None = None,
                  seconds: float = 20.0) -> tuple[float, float, bytes]:
    """Sends `head` at once, then `tail` one byte a second, until relay closes; returns the
    seconds until its first answer byte (or the close, if it never answered), until the close,
    and its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    if opened is not None:
        opened.set()

    async def drip() -> None:
        writer.write(head)
        for byte in tail:
            await asyncio.sleep(1.0)
            writer.write(bytes([byte]))
            await writer.drain()

    dripping = asyncio.create_task(drip())
    answer = b""
    took = seconds
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                took = min(took, time.monotonic() - started)
                answer += chunk
    except (ConnectionError, TimeoutError):
        pass
    finally:
        closed = time.monotonic() - started
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        writer.close()
    return min(took, closed), closed, answer


async def timed_post(http: aiohttp.ClientSession, url: str, n: int) -> tuple[int, float]:
    """One ordinary track call on a new connection: its status and seconds taken."""
    started = time.monotonic()
    async with http.post(url + "/v1/track", headers=AUTH,
                         json={"userId": "u", "event": "E", "messageId": f"ok-{n}"}) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def test_slowloris_and_endless_bodies_are_cut_off_without_starving_others(
        upstream, write_config, processes, tmp_path):
    """100 slowloris connections and 100 bodies that never finish hang; meanwhile 40 ordinary
    requests get 200 within a second; headers are cut off after header_seconds, bodies answered
    408 after body_seconds."""
    relay = await start(write_config, upstream, processes, tmp_path, max_connections=1000)
    opened = [asyncio.Event() for _ in range(200)]
    slow = [asyncio.create_task(trickle(relay.port, b"", SLOWLORIS, opened[n]))
            for n in range(100)]
    endless = [asyncio.create_task(trickle(relay.port, BODY_HEAD, b" " * 100, opened[100 + n]))
               for n in range(100)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 10.0)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.sleep(0.3)
        answers = await asyncio.gather(*(timed_post(http, relay.url, n) for n in range(40)))
    assert [status for status, _ in answers] == [200] * 40
    slowest = max(took for _, took in answers)
    assert slowest < PROMPT, f"an ordinary request took {slowest:.2f}s"
    assert all(not t.done() for t in slow + endless), "a slow connection ended too early"

    cut = [await t for t in slow]
    assert all(answer == b"" for _, _, answer in cut), {a[:60] for _, _, a in cut}
    assert max(took for took, _, _ in cut) < HEADER_SECONDS + 1.5
    timed_out = [await t for t in endless]
    statuses = {answer.split(b"\r\n", 1)[0] for _, _, answer in timed_out}
    assert statuses == {b"HTTP/1.1 408 Request Timeout"}, statuses
    assert all(b'"body_timeout"' in answer for _, _, answer in timed_out)
    assert max(took for took, _, _ in timed_out) < BODY_SECONDS + 1.5
    await upstream.wait_for(40)
    print("figures:", json.dumps({
        "test": "slow_clients", "slowloris": len(cut), "endless_bodies": len(timed_out),
        "ordinary_requests": len(answers), "slowest_ordinary_seconds": round(slowest, 3),
        "slowloris_cut_after_seconds": round(max(t for t, _, _ in cut), 2),
        "body_408_after_seconds": round(max(t for t, _, _ in timed_out), 2)}))


async def test_a_keep_alive_connection_that_goes_slow_is_cut_off(
        upstream, write_config, processes, tmp_path):
    """After one answered request, a connection that trickles its next request head is closed
    header_seconds after that answer, like a new one."""
    relay = await start(write_config, upstream, processes, tmp_path)
    body = b'{"userId": "u", "event": "Kept"}'
    request = (b"POST /v1/track HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
               b"Authorization: " + AUTH["Authorization"].encode() + b"\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    answered, closed, answer = await trickle(relay.port, request, SLOWLORIS)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1
    assert answered < PROMPT
    assert HEADER_SECONDS - 0.5 < closed - answered < HEADER_SECONDS + 1.5, (answered, closed)


async def test_connections_beyond_the_cap_get_503_quickly_then_service_resumes(
        upstream, write_config, processes, tmp_path):
    """With max_connections 20 and 20 connections hanging, the next request is answered 503 with
    Retry-After within a second; once the hanging ones are cut off, requests get 200 again."""
    relay = await start(write_config, upstream, processes, tmp_path, max_connections=20)
    opened = [asyncio.Event() for _ in range(20)]
    hanging = [asyncio.create_task(trickle(relay.port, b"", SLOWLORIS, opened[n]))
               for n in range(20)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 10.0)
    await asyncio.sleep(0.2)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.monotonic()
        async with http.post(relay.url + "/v1/track", headers=AUTH,
                             json={"userId": "u", "event": "Busy"}) as resp:
            body = await resp.json()
            assert resp.status == 503 and resp.headers["Retry-After"] == "1", body
        assert body["code"] == "too_many_connections"
        assert time.monotonic() - started < PROMPT
        await asyncio.gather(*hanging)
        assert (await timed_post(http, relay.url, 0))[0] == 200
    assert "connection(s) open, the limit; 1 refused so far" in relay.output()
    assert [m["event"] for m in await upstream.wait_for(1)] == ["E"]
