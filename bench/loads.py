"""The load: payloads with unique messageIds, and an aiohttp load generator with a histogram.

Every messageId is `{tag}-{request}-{i}` (`{tag}-w{thread}x{counter}-{i}` from wrk): the tag
names one run, so that the fake vendor counts each run's messages apart. The generator runs
closed-loop (N connections, as fast as answers come, for a time or a number of requests) or
open-loop at a fixed rate, timing each request from when it was due, as wrk2 does, so that a
stall shows in the percentiles instead of lowering the rate.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

AUTH = "Basic " + base64.b64encode(b"bench-write-key:").decode()
TRACK = ('{{{typed}"userId":"user-{u}","event":"Report Viewed","messageId":"{mid}",'
         '"timestamp":"{ts}","properties":{{"report":"weekly","rows":{n}}},'
         '"context":{{"library":{{"name":"analytics-python","version":"2.4.0"}}}}{sent}}}')
IDENTIFY = ('{{"type":"identify","userId":"user-{u}","messageId":"{mid}","timestamp":"{ts}",'
            '"traits":{{"email":"user-{u}@customer.example","created_at":"2024-01-01"}}}}')
GROUP = ('{{"type":"group","userId":"user-{u}","messageId":"{mid}","timestamp":"{ts}",'
         '"groupId":"company-{g}"}}')
USERS = 5000


@functools.lru_cache(maxsize=128)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def stamp(seconds: int, ms: int) -> str:
    """A time as the SDKs write it: UTC, to the millisecond, with `Z`."""
    return f"{_second(seconds)}.{ms:03d}Z"


def event_time(n: int, now: int) -> str:
    """When message `n` happened: in the minute before `now`, to the millisecond, each message
    a time of its own, as SDKs send them (one shared time would hide the cost of correcting
    each for the client's clock skew)."""
    return stamp(now - 1 - n % 60, n % 1000)


def message(n: int, mid: str, typed: bool, now: int) -> str:
    """Message number `n` of the B2B mix: mostly tracks, some identifies and group calls, all
    from customers (no rule drops any of them). A single call (`typed` False) carries its own
    `sentAt`, as analytics.js sends one."""
    u, ts = n % USERS, event_time(n, now)
    if typed and n % 50 == 0:
        return IDENTIFY.format(u=u, mid=mid, ts=ts)
    if typed and n % 20 == 0:
        return GROUP.format(u=u, mid=mid, g=n % 7, ts=ts)
    sent = "" if typed else f',"sentAt":"{stamp(now, 0)}"'
    return TRACK.format(typed='"type":"track",' if typed else "", u=u, mid=mid, n=n, ts=ts,
                        sent=sent)


@dataclass(frozen=True)
class Shape:
    """What each request carries: one /v1/track call, or a /v1/batch of `per_request` items
    with the batch's `sentAt`, as the SDKs send them."""

    path: str
    per_request: int

    def body(self, tag: str, request: int) -> bytes:
        now = int(time.time())
        if self.path == "/v1/track":
            return message(request, f"{tag}-{request}-0", False, now).encode()
        items = ",".join(message(request * self.per_request + i, f"{tag}-{request}-{i}", True,
                                 now) for i in range(self.per_request))
        return ('{"batch":[' + items + f'],"sentAt":"{stamp(now, 0)}"}}').encode()


TRACK_SHAPE = Shape("/v1/track", 1)


def batch_shape(size: int) -> Shape:
    return Shape("/v1/batch", size)


class Histogram:
    """Latencies in buckets about 1% wide, from 1 µs up; percentiles read from the buckets."""

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        us = max(seconds * 1e6, 1.0)
        self.buckets[int(math.log(us) * 100)] += 1
        self.count += 1
        self.max = max(self.max, seconds)

    def percentile(self, pct: float) -> float:
        """Seconds below which `pct` percent of the samples lie (0 when there are none)."""
        if not self.count:
            return 0.0
        rank = math.ceil(self.count * pct / 100)
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return math.exp((bucket + 1) / 100) / 1e6
        return self.max


@dataclass
class RunResult:
    """One load run against one target."""

    target: str
    per_request: int
    seconds: float
    ok: int = 0  # requests answered 200
    non200: int = 0  # answered with another status
    errors: int = 0  # no answer: refused, reset, timed out
    p50: float = 0.0  # seconds
    p99: float = 0.0
    max: float = 0.0
    tag: str = ""
    ok_requests: list[int] | None = field(default=None, repr=False)  # exact, generator only

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def mps(self) -> float:
        return self.rps * self.per_request

    @property
    def accepted(self) -> int:
        return self.ok * self.per_request


class Generator:
    """Sends `shape` requests to `url` over up to `connections` keep-alive connections."""

    def __init__(self, target: str, url: str, shape: Shape, tag: str, connections: int) -> None:
        self.target = target
        self.url = url + shape.path
        self.shape = shape
        self.tag = tag
        self.connections = connections
        self.histogram = Histogram()
        self.ok_at: dict[int, float] = {}  # request number -> when it was answered 200
        self.timed_from = 0.0  # requests due before this are not timed (warm-up)
        self.non200 = 0
        self.errors = 0
        self._numbers = itertools.count()

    async def closed(self, seconds: float | None, requests: int | None = None) -> RunResult:
        """As fast as answers come, until `seconds` pass or `requests` were sent."""
        deadline = time.monotonic() + seconds if seconds else math.inf
        limit = requests if requests is not None else math.inf

        async def worker(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < deadline:
                number = next(self._numbers)
                if number >= limit:
                    return
                await self._send(session, number, time.monotonic())

        start = time.monotonic()
        async with self._session() as session:
            await asyncio.gather(*(worker(session) for _ in range(self.connections)))
        return self._result(time.monotonic() - start)

    async def open(self, rate: float, seconds: float, warm_up: float = 0.0) -> RunResult:
        """`rate` requests a second for `warm_up` + `seconds`, each timed from when it was due;
        those due in the first `warm_up` seconds are sent but not timed."""
        total = max(int(rate * (seconds + warm_up)), 1)
        gate = asyncio.Semaphore(self.connections)
        tasks: list[asyncio.Task[None]] = []

        async def one(session: aiohttp.ClientSession, number: int, due: float) -> None:
            async with gate:
                await self._send(session, number, due)

        start = time.monotonic()
        self.timed_from = start + warm_up
        async with self._session() as session:
            for number in range(total):
                due = start + number / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(session, number, due)))
            await asyncio.gather(*tasks)
        return self._result(time.monotonic() - start)

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.connections)
        timeout = aiohttp.ClientTimeout(total=30)
        headers = {"Authorization": AUTH, "Content-Type": "application/json"}
        return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

    async def _send(self, session: aiohttp.ClientSession, number: int, since: float) -> None:
        body = self.shape.body(self.tag, number)
        try:
            async with session.post(self.url, data=body) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.errors += 1
            return
        now = time.monotonic()
        if since >= self.timed_from:
            self.histogram.add(now - since)
        if status == 200:
            self.ok_at[number] = now
        else:
            self.non200 += 1

    def _result(self, seconds: float) -> RunResult:
        h = self.histogram
        return RunResult(self.target, self.shape.per_request, seconds, len(self.ok_at),
                         self.non200, self.errors, h.percentile(50), h.percentile(99), h.max,
                         self.tag, sorted(self.ok_at))
