"""The durable per-upstream queue in SQLite: group commit in, acks and dead letters out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import aiosqlite

from relay import inventory, state
from relay.capacity import Capacity, OutboxFull
from relay.writer import Writer

log = logging.getLogger("relay.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    upstream TEXT NOT NULL,
    write_key TEXT NOT NULL,
    user_key TEXT NOT NULL,
    body TEXT NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_upstream ON outbox (upstream, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    upstream TEXT NOT NULL,
    write_key TEXT NOT NULL,
    user_key TEXT NOT NULL,
    body TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    status INTEGER NOT NULL,
    answer TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS writable_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""


class StorageError(Exception):
    """SQLite could not commit: the request must not be answered 200."""


# One accepted message, serialised, as it goes into every upstream's queue: (user_key, body).
# A plain tuple: one is made per message, and a NamedTuple takes ~0.5 µs longer to make.
Entry = tuple[str, str]


class Pending(NamedTuple):
    """One queued message of one upstream, as the forwarder reads it (a tuple, made straight
    from the row: a backlog drains hundreds of them per batch)."""

    id: int
    write_key: str
    user_key: str
    body: str
    enqueued_at: float


Statement = tuple[str, list[tuple[Any, ...]]]

_INSERT = ("INSERT INTO outbox (upstream, write_key, user_key, body, enqueued_at)"
           " VALUES (?, ?, ?, ?, ?)")
# One statement for a whole batch: executemany would bind and step once per id, taking the GIL
# back from the event loop each time.
_DELETE = "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))"
_PROBE = "INSERT OR REPLACE INTO writable_probe (id, at) VALUES (1, ?)"
PROBE_SECONDS = 1.0
# Under load (a commit ended less than BUSY_SECONDS ago) the writer waits GATHER_SECONDS before
# the next one, so that more requests share it: a commit's fsync and thread hop cost more CPU
# than its rows (bench/profile.md). An idle relay commits at once.
BUSY_SECONDS = 0.005
GATHER_SECONDS = 0.001
STATS_SECONDS = 5.0
SLOW_STATS_SECONDS = 0.05
_DEAD = ("INSERT INTO dead_letters (upstream, write_key, user_key, body, enqueued_at, failed_at,"
         " status, answer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_COUNT = ("INSERT INTO counters (name, count) VALUES (?, ?)"
          " ON CONFLICT(name) DO UPDATE SET count = count + excluded.count")
# Upserts whose rows are (key, n) and add n to the key's row: rows for one key may be summed.
_ADDITIVE = frozenset({_COUNT, state.UNGROUPED})


class Outbox:
    """One SQLite file (WAL); one writer task commits every queued write in one transaction."""

    def __init__(self, path: str, upstreams: Sequence[str], synchronous: str = "full",
                 capacity: Capacity | None = None) -> None:
        self.path = path
        self.capacity = capacity or Capacity(0, "reject")
        self.upstreams = tuple(upstreams)
        self.synchronous = synchronous.upper()
        self.writable = False
        self.commits = 0
        self._committed_at = 0.0  # time.monotonic() when the last commit ended
        self._writer = Writer(path)
        self._reader: aiosqlite.Connection | None = None
        self._ops: list[tuple[list[Statement], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._signals = {name: asyncio.Event() for name in self.upstreams}
        self._stats: tuple[float, list[inventory.QueueStats]] | None = None
        self._stats_conn: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Opens (creating if needed) the database; raises sqlite3 errors for a bad file."""
        directory = os.path.dirname(os.path.abspath(self.path))  # noqa: ASYNC240 (once, at start)
        os.makedirs(directory, exist_ok=True)
        try:
            await self._connect()
        except BaseException:
            await self.close()  # aiosqlite's threads would otherwise keep the process alive
            raise
        self.writable = True
        self._task = asyncio.create_task(self._write_loop(), name="outbox-writer")
        for event in self._signals.values():
            event.set()  # a backlog from the last run is there to be sent

    async def _connect(self) -> None:
        pragmas = ["PRAGMA journal_mode=WAL", f"PRAGMA synchronous={self.synchronous}",
                   "PRAGMA busy_timeout=5000"]
        verdict = await self._writer.open(pragmas, SCHEMA)
        if verdict != ["ok"]:
            raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(verdict[:3]))
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=5000")
        try:
            await self._reader.execute("SELECT value FROM json_each('[1]')")
        except sqlite3.OperationalError:
            raise sqlite3.DatabaseError(
                f"SQLite {sqlite3.sqlite_version} has no JSON functions; relay needs SQLite 3.38"
                " or later (or one built with JSON1)") from None
        await self.capacity.sync(self._reader)

    async def close(self) -> None:
        """Commits what is queued, then closes both connections."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None
        for conn in (self._reader, self._stats_conn):
            if conn is not None:
                await conn.close()
        self._reader = self._stats_conn = None
        await self._writer.close()

    def signal(self, upstream: str) -> asyncio.Event:
        """Set whenever new messages for `upstream` are committed."""
        return self._signals[upstream]

    async def put(
        self,
        write_key: str,
        entries: Sequence[Entry],
        counts: dict[str, int],
        state: Sequence[Statement] = (),
    ) -> None:
        """Commits `entries` into every upstream's queue with `counts` and the rules' `state`
        writes, in one transaction; returns once durable."""
        now = time.time()
        rows = [(u, write_key, key, body, now) for u in self.upstreams for key, body in entries]
        size = sum(len(body) for _, body in entries) * len(self.upstreams)
        assert self._reader is not None
        try:
            room = await self.capacity.admit(size, self._reader)
        except OutboxFull as exc:
            raise StorageError(str(exc)) from None
        if room:
            counts["dropped.outbox_full"] = counts.get("dropped.outbox_full", 0) + len(room[0][1])
        await self._submit([*room, (_INSERT, rows), (_COUNT, list(counts.items())), *state])
        self.capacity.added(size)
        if rows:
            for event in self._signals.values():
                event.set()

    async def next_batch(
        self, upstream: str, max_messages: int, max_bytes: int, by_key: bool, after: int = 0
    ) -> list[Pending]:
        """The oldest messages of `upstream` with ids over `after` (all with the oldest one's
        key when `by_key`)."""
        assert self._reader is not None
        sql = ("SELECT id, write_key, user_key, body, enqueued_at FROM outbox"
               " WHERE upstream = ? AND id > ?")
        args: tuple[Any, ...] = (upstream, after)
        if by_key:
            sql += (" AND write_key = (SELECT write_key FROM outbox WHERE upstream = ?"
                    " AND id > ? ORDER BY id LIMIT 1)")
            args = (upstream, after, upstream, after)
        async with self._reader.execute(sql + " ORDER BY id LIMIT ?", (*args, max_messages)) as cur:
            rows = await cur.fetchall()
        batch: list[Pending] = []
        size = 0
        for row in rows:
            size += len(row[3]) + 1
            if batch and size > max_bytes:
                break
            batch.append(Pending(*row))
        return batch

    async def ack(self, pending: Iterable[Pending]) -> None:
        """Removes delivered messages."""
        pending = list(pending)
        await self._submit([(_DELETE, [_ids(pending)])])
        self.capacity.removed({p.id: len(p.body) for p in pending})

    async def dead_letter(
        self, upstream: str, pending: Sequence[Pending], status: int, answer: str
    ) -> None:
        """Moves messages the upstream refused for good into `dead_letters`, with its answer."""
        now = time.time()
        rows = [(upstream, p.write_key, p.user_key, p.body, p.enqueued_at, now, status, answer)
                for p in pending]
        await self._submit([(_DEAD, rows), (_DELETE, [_ids(pending)])])
        self.capacity.removed({p.id: len(p.body) for p in pending})

    async def backlog(self, upstream: str) -> int:
        """How many messages wait for `upstream`."""
        assert self._reader is not None
        sql = "SELECT count(*) FROM outbox WHERE upstream = ?"
        async with self._reader.execute(sql, (upstream,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def stats(self) -> list[inventory.QueueStats]:
        """What each upstream's queue holds, on a connection of its own so the forwarders' reads
        never wait behind it. With a large backlog the query takes a while and scrapers ask
        often: an answer that was slow to get is reused for STATS_SECONDS."""
        now = time.monotonic()
        if self._stats is None or now > self._stats[0]:
            if self._stats_conn is None:
                self._stats_conn = await aiosqlite.connect(self.path, isolation_level=None)
            fresh = await inventory.stats(self._stats_conn, self.upstreams)
            took = time.monotonic() - now
            self._stats = (now + (STATS_SECONDS if took > SLOW_STATS_SECONDS else 0.0), fresh)
        return self._stats[1]

    async def _submit(self, statements: list[Statement]) -> None:
        if self._task is None or self._closing:
            raise StorageError("storage is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.append((statements, future))
        self._wake.set()
        await future

    async def _write_loop(self) -> None:
        while True:
            if self.writable:
                await self._wake.wait()
            else:
                # Nothing may arrive while /readyz says not ready: find out by ourselves when
                # the disk can be written again.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), PROBE_SECONDS)
            if self.writable and time.monotonic() - self._committed_at < BUSY_SECONDS:
                await asyncio.sleep(GATHER_SECONDS)
            self._wake.clear()
            ops, self._ops = self._ops, []
            if not ops and not self.writable and not self._closing:
                probe: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                probe.add_done_callback(lambda f: f.exception())  # nobody awaits a probe
                ops = [([(_PROBE, [(time.time(),)])], probe)]
            if ops:
                await self._commit(ops)
            if self._closing and not self._ops:
                return

    async def _commit(self, ops: list[tuple[list[Statement], asyncio.Future[None]]]) -> None:
        try:
            # Every queued write in one transaction, so one fsync serves them all.
            await self._writer.transaction(_merged(s for st, _ in ops for s in st))
        except Exception as exc:  # whatever it is, the requests waiting on it must not hang
            if self.writable:
                log.error("storage: cannot commit (%s); answering 503 until it can", exc)
            self.writable = False
            error = StorageError(str(exc))
            for _, future in ops:
                if not future.done():
                    future.set_exception(error)
            return
        if not self.writable:
            log.warning("storage: writable again")
        self.writable = True
        self.commits += 1
        self._committed_at = time.monotonic()
        for _, future in ops:
            if not future.done():
                future.set_result(None)


def _ids(pending: Iterable[Pending]) -> tuple[str]:
    """The ids of `pending` as the one parameter of _DELETE: a JSON array."""
    return ("[" + ",".join(str(p.id) for p in pending) + "]",)


def _merged(statements: Iterable[Statement]) -> list[Statement]:
    """One executemany per SQL text (in the order each first appears, its rows in their order)
    instead of one per request, and counts for one key summed first. Writes of different SQL
    texts commute: outbox rows are only inserted with fresh ids (AUTOINCREMENT) or deleted by
    id, and every other table is written by one SQL text alone."""
    by_sql: dict[str, list[tuple[Any, ...]]] = {}
    for sql, rows in statements:
        if rows:
            by_sql.setdefault(sql, []).extend(rows)
    for sql in _ADDITIVE & by_sql.keys():
        sums: dict[Any, int] = {}
        for key, n in by_sql[sql]:
            sums[key] = sums.get(key, 0) + n
        by_sql[sql] = list(sums.items())
    return list(by_sql.items())
