"""The Redis that several relays share user state through: reads coalesced into one call per turn
of the event loop, writes applied by `redis_scripts.APPLY`, and whether it answers at all.

Redis is never on the path that decides whether a message is stored: a read waits at most
`state.timeout_ms`, a failure marks the store down (one log line) and relays decide from what
they know until a probe finds it back (one more line). redis-py's own retries are off: a retry
would wait on a request's time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from relay.metrics import Metrics
from relay.state import redis_scripts

if TYPE_CHECKING:  # the config is read by every stage; it imports the stages itself
    from relay.config.model import UserState

log = logging.getLogger("relay.state")

# What a failed call to Redis can raise: its own errors, and a timeout of relay's.
FAILURES = (RedisError, OSError, TimeoutError)
# A write of ops may take longer than a read: it is off every request's path.
APPLY_SECONDS = 2.0


class Fetched(NamedTuple):
    """What Redis holds about one ref: its current group (None), when it became so, and its
    internal verdict's reason (None when not internal). A tuple: one is made per user fetched."""

    group: str | None
    at: str | None
    internal: str | None


class RedisStore:
    """One relay's client of the shared Redis."""

    def __init__(self, settings: UserState, metrics: Metrics) -> None:
        self.prefix = settings.key_prefix
        self.ttl = max(int(settings.ttl_days * 86400), 1)
        self.timeout = settings.timeout_ms / 1000
        self.metrics = metrics
        self.client = aioredis.Redis.from_url(
            settings.url, socket_timeout=max(self.timeout, APPLY_SECONDS),
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0),
            encoding_errors="surrogatepass", decode_responses=True, max_connections=8,
            client_name="relay")
        self._fetch = self.client.register_script(redis_scripts.FETCH)
        self._apply = self.client.register_script(redis_scripts.APPLY)
        self._report = self.client.register_script(redis_scripts.REPORT)
        self.up: bool | None = None  # unknown until the first call
        self.epoch: str | None = None  # the last one Redis said
        self._asked: dict[str, list[asyncio.Future[dict[str, Fetched] | None]]] = {}
        self._in_flight = False
        self._sending: asyncio.Handle | None = None
        self._reader: AbstractConnection | None = None  # the fetches' own connection

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.disconnect()
        await self.client.aclose()

    # reads

    async def fetch(self, refs: Sequence[str]) -> dict[str, Fetched] | None:
        """What Redis holds about `refs`, or None when it cannot say within the timeout (it is
        down, paused or slow). Requests read in one turn of the event loop share one call."""
        if not refs or self.up is False:
            return None if refs else {}
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Fetched] | None] = loop.create_future()
        for ref in refs:
            self._asked.setdefault(ref, []).append(future)
        if not self._in_flight and self._sending is None:
            self._sending = loop.call_soon(self._send)
        # A timer rather than asyncio.timeout and shield: this runs for most requests.
        timer = loop.call_later(self.timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _send(self) -> None:
        self._sending = None
        asked, self._asked = self._asked, {}
        if asked:
            self._in_flight = True
            asyncio.get_running_loop().create_task(self._call(asked))

    async def _call(self, asked: dict[str, list[asyncio.Future[dict[str, Fetched] | None]]]
                    ) -> None:
        refs = list(asked)
        started = time.perf_counter()
        found: dict[str, Fetched] | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._read(refs)
            self.metrics.store_seconds.observe(time.perf_counter() - started)
            self.came_back()
            self.epoch = reply[0] or None
            found = {ref: Fetched(reply[n], reply[n + 1], reply[n + 2])
                     for n, ref in zip(range(1, 3 * len(refs), 3), refs, strict=True)}
        except FAILURES as exc:
            self.went_down(exc)
            # A read cut off by the timeout may still be answered: the next must not take it.
            reader, self._reader = self._reader, None
            if reader is not None:
                await reader.disconnect(nowait=True)
        finally:
            self._in_flight = False
            for waiting in asked.values():
                for future in waiting:
                    if not future.done():
                        future.set_result(found)
            if self._asked:
                self._send()

    async def _read(self, refs: list[str]) -> list[str | None]:
        """FETCH on the reads' own connection, sent and read directly: through the client
        (its pool, retry wrapper, script object and a timeout per socket read) a call cost
        relay's event loop ~100 µs more, and most requests wait on one."""
        conn = self._reader
        if conn is None:
            pool = self.client.connection_pool
            conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            await conn.connect()  # type: ignore[no-untyped-call]
            self._reader = conn  # only once connected: a failed connect is not kept
        args = (self.prefix, dumps(refs))
        await conn.send_packed_command(conn.pack_command("EVALSHA", self._fetch.sha, 0, *args),
                                       check_health=False)
        try:
            reply = await conn.read_response()
        except NoScriptError:  # a Redis restarted since the script was loaded
            await conn.send_packed_command(
                conn.pack_command("EVAL", redis_scripts.FETCH, 0, *args), check_health=False)
            reply = await conn.read_response()
        return cast(list[str | None], reply)

    # writes

    async def apply(self, ops_json: str) -> str:
        """Applies the ops (a JSON list, in order); gives Redis's epoch. Raises on failure."""
        async with asyncio.timeout(APPLY_SECONDS):
            epoch = await self._apply(args=[self.prefix, self.ttl, time.time(),
                                            f"{uuid.uuid4().hex}@{time.time():.3f}", ops_json])
        self.came_back()
        self.epoch = str(epoch)
        return self.epoch

    async def report(self) -> tuple[list[tuple[str, int, list[str]]], list[tuple[str, str, float]]]:
        """Users in more than one group (ref, tracks without a group, groups) and internal users
        (ref, reason, first seen), across every relay."""
        async with asyncio.timeout(APPLY_SECONDS):
            reply = await self._report(args=[self.prefix, time.time(), self.ttl])
        split = reply.index(None) if None in reply else len(reply)
        multi, internal = reply[:split], reply[split + 1:]
        return ([(multi[n], int(multi[n + 1]), multi[n + 2].split("\n"))
                 for n in range(0, len(multi), 3)],
                [(internal[n], internal[n + 1], float(internal[n + 2]))
                 for n in range(0, len(internal), 3)])

    def epoch_age(self) -> float:
        """Seconds since Redis's epoch began (since it was last found empty); 0 when unknown."""
        _, _, since = (self.epoch or "").partition("@")
        try:
            return max(time.time() - float(since), 0.0)
        except ValueError:
            return 0.0

    # whether it answers

    def went_down(self, exc: BaseException) -> None:
        if self.up is not False:
            log.warning("state: Redis does not answer (%s); deciding from what this relay"
                        " knows until it does", _describe(exc))
        self.up = False
        self.metrics.store_up.set(0)

    def came_back(self) -> None:
        if self.up is False:
            log.warning("state: Redis answers again")
        self.up = True
        self.metrics.store_up.set(1)


def _expire(future: asyncio.Future[dict[str, Fetched] | None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def dumps(values: list[Any]) -> str:
    """Ops or refs as JSON for Redis's cjson; ids that are no valid UTF-8 (lone surrogates,
    which JSON allows) go as they are, as the keys relay sends them do."""
    try:
        return orjson.dumps(values).decode()
    except TypeError:
        return json.dumps(values, ensure_ascii=False)
