"""The queue operations for operators: stats, dead letters (list, show, replay), purging a user.

Each function opens its own connection to the config's database, so they work while relay runs
(SQLite WAL: readers never wait, and each write is a short transaction of at most CHUNK rows, so
relay's own commits wait milliseconds, not the length of the whole run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite

from relay import clock, inventory, protocol
from relay.config import Config
from relay.ingest import mask
from relay.inventory import QueueStats
from relay.pipeline import Pipeline, RuleContext
from relay.progress import Progress, silent
from relay.state import SqliteState

CHUNK = 500  # rows per transaction
BUSY_MS = 5000  # how long a write waits for relay's own commit to finish

_AGE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_INSERT = ("INSERT INTO outbox (upstream, write_key, user_key, body, enqueued_at)"
           " VALUES (?, ?, ?, ?, ?)")
_COUNT = ("INSERT INTO counters (name, count) VALUES (?, ?)"
          " ON CONFLICT(name) DO UPDATE SET count = count + excluded.count")
_DEAD = ("SELECT id, upstream, write_key, user_key, body, enqueued_at, failed_at, status, answer"
         " FROM dead_letters")
# A message of the user: by the column the outbox orders by, or by either id in its body.
_USER = ("(user_key = :user OR CASE WHEN json_valid(body) THEN"
         " CAST(json_extract(body, '$.userId') AS TEXT) = :user"
         " OR CAST(json_extract(body, '$.anonymousId') AS TEXT) = :user END)")


class QueueError(Exception):
    """A problem the operator must be told about: no database, an unknown upstream, a bad time."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as operators see it: the write key masked, the message read."""

    id: int
    upstream: str
    write_key: str
    user: str
    message_id: str | None
    type: str | None
    event: str | None
    enqueued_at: str
    failed_at: str
    status: int
    answer: str
    message: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeadList:
    """The dead letters selected (at most the limit asked for) and how many there are in all."""

    letters: list[DeadLetter]
    total: int


@dataclass
class Replayed:
    """What a replay did: re-queued per upstream, dropped per rule, and what it left alone."""

    selected: int = 0
    requeued: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0
    unknown_upstreams: dict[str, int] = field(default_factory=dict)
    full: bool = False  # stopped: the outbox would pass storage.max_bytes


@dataclass
class Purged:
    """What a purge removed, per upstream."""

    messages: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)


def parse_since(text: str, now: float | None = None) -> float:
    """`text` (an ISO-8601 time, or an age like `30m`, `2h`, `7d`, `1h30m`) as a Unix time."""
    value = text.strip()
    if _AGE.fullmatch(value):
        age = sum(float(n) * _UNITS[u] for n, u in re.findall(r"([\d.]+)([smhdw])", value))
        return (time.time() if now is None else now) - age
    moment = clock.parse(value)
    if moment is None:
        raise QueueError(f"{text!r} is neither an ISO-8601 time (like 2024-05-01T12:00:00Z)"
                         " nor an age (like 30m, 2h, 7d)")
    return moment.timestamp()


async def stats(config: Config) -> list[QueueStats]:
    """Each upstream's queue: waiting messages, bytes, the oldest one's age, dead letters."""
    async with _connect(config.storage.path) as conn:
        return await inventory.stats(conn, [u.name for u in config.upstreams])


async def paused(config: Config) -> dict[str, bool] | None:
    """Which upstreams the running relay has paused, from its GET /admin/queue; None when
    `admin.token` is empty or relay does not answer at `listen`."""
    if not config.admin.token:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.port}/admin/queue"
    auth = {"Authorization": f"Bearer {config.admin.token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http, \
                http.get(url, headers=auth) as response:
            body = await response.json() if response.status == 200 else None
        return {str(q["upstream"]): bool(q["paused"]) for q in body["upstreams"]} if body else None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError, TypeError):
        return None


async def dead_list(config: Config, upstream: str | None = None, since: str | None = None,
                    limit: int = 100) -> DeadList:
    """The oldest `limit` dead letters of `upstream` (else all) that failed since `since`."""
    where, args = _dead_filter(upstream, since)
    async with _connect(config.storage.path) as conn:
        total = await _scalar(conn, f"SELECT count(*) FROM dead_letters WHERE {where}", args)
        rows = await conn.execute_fetchall(
            f"{_DEAD} WHERE {where} ORDER BY id LIMIT ?", [*args, limit])
    return DeadList([_letter(row, with_message=False) for row in rows], total)


async def dead_show(config: Config, dead_id: int) -> DeadLetter | None:
    """One dead letter with its whole message, or None when there is no such id."""
    async with _connect(config.storage.path) as conn:
        rows = list(await conn.execute_fetchall(f"{_DEAD} WHERE id = ?", (dead_id,)))
    return _letter(rows[0], with_message=True) if rows else None


async def dead_replay(config: Config, upstream: str | None = None, since: str | None = None,
                      progress: Progress = silent) -> Replayed:
    """Runs the selected dead letters through the current rules, back into the outbox.

    Kept messages go to the end of the queue of the upstream they died at; dropped ones are
    deleted and counted. Each chunk (re-queued rows, deleted dead letters, the rules' state and
    counters) is one transaction. Dead letters of upstreams no longer configured stay, and so
    does the rest once the outbox would pass `storage.max_bytes`.
    """
    names = [u.name for u in config.upstreams]
    if upstream is not None and upstream not in names:
        raise QueueError(f"upstream {upstream!r} is not in the config ({', '.join(names)})")
    where, args = _dead_filter(upstream, since)
    marks = ", ".join("?" * len(names))
    result = Replayed()
    async with _connect(config.storage.path) as conn:
        result.unknown_upstreams = {str(name): int(n) for name, n in await conn.execute_fetchall(
            f"SELECT upstream, count(*) FROM dead_letters WHERE {where}"
            f" AND upstream NOT IN ({marks}) GROUP BY upstream ORDER BY upstream", [*args, *names])}
        where, args = f"{where} AND upstream IN ({marks})", [*args, *names]
        result.selected = await _scalar(conn, f"SELECT count(*) FROM dead_letters WHERE {where}",
                                        args)
        state = SqliteState(config.storage.path, config.storage.cache_size)
        await state.open()
        try:
            replay = _Replay(conn, Pipeline(config.rules, config.on_rule_error), state,
                             config.storage.max_bytes, result)
            sql = f"{_DEAD} WHERE id > ? AND {where} ORDER BY id LIMIT {CHUNK}"
            last = done = 0
            progress(0, result.selected)
            while not result.full and (rows := await conn.execute_fetchall(sql, [last, *args])):
                rows = list(rows)
                last, done = rows[-1][0], done + len(rows)
                await replay.chunk(rows)
                progress(done, result.selected)
        finally:
            await state.close()
    return result


async def purge_user(config: Config, user_id: str, progress: Progress = silent) -> Purged:
    """Deletes every waiting message and dead letter whose userId or anonymousId is `user_id`.

    A batch the forwarder is sending at that moment can still arrive at the vendor.
    """
    if not user_id:
        raise QueueError("the user id must not be empty")
    result = Purged()
    async with _connect(config.storage.path) as conn:
        await conn.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left
        found = {"user": user_id}
        total = 0
        for table in ("outbox", "dead_letters"):
            total += await _scalar(conn, f"SELECT count(*) FROM {table} WHERE {_USER}", found)
        progress(0, total)
        done = 0
        for table, removed in (("outbox", result.messages),
                               ("dead_letters", result.dead_letters)):
            sql = f"SELECT id FROM {table} WHERE id > :after AND {_USER} ORDER BY id LIMIT {CHUNK}"
            last = 0
            while ids := [int(row[0]) for row in await conn.execute_fetchall(
                    sql, {**found, "after": last})]:
                last, done = ids[-1], done + len(ids)
                async with _transaction(conn):
                    gone = await conn.execute_fetchall(
                        f"DELETE FROM {table} WHERE id IN ({_marks(ids)}) RETURNING upstream", ids)
                removed.update(str(row[0]) for row in gone)
                progress(done, total)
    return result


class _Full(Exception):
    """The chunk would take the outbox past `storage.max_bytes`."""


@dataclass
class _Replay:
    """One replay run: a chunk of dead letters through the rules, then one transaction."""

    conn: aiosqlite.Connection
    pipeline: Pipeline
    state: SqliteState
    max_bytes: int
    result: Replayed

    async def chunk(self, rows: Sequence[Any]) -> None:
        ctx = RuleContext(state=self.state, route="")
        kept: dict[int, tuple[str, str, str, str]] = {}
        dropped: dict[int, str] = {}
        for row in rows:
            message = _loads(row[4])
            if message is None:
                self.result.unreadable += 1  # left where it is
                continue
            outcome = await self.pipeline.run(message, ctx)
            if outcome.message is None:
                dropped[row[0]] = str(outcome.dropped_by)
            else:
                final = outcome.message
                kept[row[0]] = (row[1], row[2], protocol.user_key(final), protocol.dumps(final))
        try:
            await self._commit(kept, dropped)
        except _Full:
            self.state.forget()
            self.result.full = True
        except BaseException:
            self.state.forget()  # its cache holds writes that were not committed
            raise

    async def _commit(self, kept: dict[int, tuple[str, str, str, str]],
                      dropped: dict[int, str]) -> None:
        ids = [*kept, *dropped]
        if not ids:
            return
        async with _transaction(self.conn):
            size = sum(len(row[3]) for row in kept.values())
            if self.max_bytes and size and (
                    await inventory.stored_bytes(self.conn) + size > self.max_bytes):
                raise _Full
            # Only what this transaction deleted is re-queued: a concurrent purge or replay wins.
            gone = {row[0] for row in await self.conn.execute_fetchall(
                f"DELETE FROM dead_letters WHERE id IN ({_marks(ids)}) RETURNING id", ids)}
            now = time.time()
            await self.conn.executemany(_INSERT, [(*kept[i], now) for i in kept if i in gone])
            drops = Counter(rule for i, rule in dropped.items() if i in gone)
            await self.conn.executemany(_COUNT, [(f"dropped.{r}", n) for r, n in drops.items()])
            for sql, params in self.state.drain():
                await self.conn.executemany(sql, params)
        self.result.requeued.update(kept[i][0] for i in kept if i in gone)
        self.result.dropped.update(drops)


@contextlib.asynccontextmanager
async def _connect(path: str) -> AsyncIterator[aiosqlite.Connection]:
    """A connection to an existing relay database (never creates one)."""
    conn = await aiosqlite.connect(_uri(path), uri=True, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        tables = {row[0] for row in await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"outbox", "dead_letters"} <= tables:
            raise QueueError(f"{path} holds no relay queue (no outbox table)")
        yield conn
    finally:
        await conn.close()


def _uri(path: str) -> str:
    """The database as an SQLite URI that opens it read-write and never creates it."""
    if not os.path.isfile(path):
        raise QueueError(f"no database at {path}: relay has not run with this storage.path")
    return Path(path).absolute().as_uri() + "?mode=rw"


@contextlib.asynccontextmanager
async def _transaction(conn: aiosqlite.Connection) -> AsyncIterator[None]:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


def _dead_filter(upstream: str | None, since: str | None) -> tuple[str, list[Any]]:
    moment = None if since is None else parse_since(since)
    wanted = [("upstream = ?", upstream), ("failed_at >= ?", moment)]
    chosen = [(sql, arg) for sql, arg in wanted if arg is not None]
    return " AND ".join(["1", *(sql for sql, _ in chosen)]), [arg for _, arg in chosen]


async def _scalar(conn: aiosqlite.Connection, sql: str, args: Any) -> int:
    rows = list(await conn.execute_fetchall(sql, args))
    return int(rows[0][0])


def _marks(ids: Sequence[int]) -> str:
    return ", ".join("?" * len(ids))


def _loads(body: str) -> dict[str, Any] | None:
    try:
        message = json.loads(body)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _letter(row: Sequence[Any], with_message: bool) -> DeadLetter:
    dead_id, upstream, key, user, body, enqueued, failed, status, answer = row
    message = _loads(body) or {}

    def said(name: str) -> str | None:
        return None if message.get(name) is None else str(message[name])

    return DeadLetter(dead_id, upstream, mask(key), user, said("messageId"), said("type"),
                      said("event"), iso(enqueued), iso(failed), status, answer,
                      message if with_message else None)


def iso(moment: float) -> str:
    """A Unix time as an ISO-8601 UTC time."""
    return clock.iso(clock.datetime_of(moment))

