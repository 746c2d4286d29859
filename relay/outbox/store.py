"""The durable per-upstream queue in SQLite: group commit in, acks and dead letters out."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import aiosqlite
import orjson

from relay.outbox import stats as outbox_stats
from relay.outbox.capacity import Capacity, OutboxFull
from relay.outbox.group_commit import GroupCommit, StorageError
from relay.outbox.writer import Statement, Writer

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


# The oldest rows `where` holds, up to a count and a size, so that rows beyond max_batch_bytes
# are never read out (with 32 KB messages, a batch of 500 would read 16 MB to send 500 KB). When
# the first max_batch_messages rows fit, as they nearly always do, their total alone says so;
# only when they do not is a running sum worked out (a window costs ~0.3 ms per 500 rows, which
# slowed the drain by a tenth).
_CANDIDATES = ("SELECT id, length(CAST(body AS BLOB)) AS size FROM outbox WHERE {where}"
               " ORDER BY id LIMIT ?")
_OLDEST = ("FROM (SELECT id, write_key, user_key, body, enqueued_at FROM outbox WHERE {where}"
           " AND id <= CASE WHEN (SELECT sum(size + 1) FROM (" + _CANDIDATES + ")) <= ?"
           " THEN (SELECT max(id) FROM (" + _CANDIDATES + "))"
           " ELSE (SELECT max(id) FROM (SELECT id, row_number() OVER w AS n, sum(size + 1)"
           " OVER w AS upto FROM (" + _CANDIDATES + ") WINDOW w AS (ORDER BY id ROWS"
           " UNBOUNDED PRECEDING)) WHERE upto <= ? OR n = 1) END ORDER BY id LIMIT ?)")
# Lengths in bytes, as blobs: SQLite counts a text's length character by character, a blob's it
# has (0.22 against 0.48 ms for 500 bodies). Stored bodies are ASCII, so the two agree; should
# one not be, the lengths do not add up and the batch is read quoted (`Outbox._rows`).
_READ_SPLIT = ("SELECT json_group_array(json_array(id, write_key, user_key,"
               " length(CAST(body AS BLOB)), enqueued_at)), group_concat(body, '') " + _OLDEST)
_READ_QUOTED = ("SELECT json_group_array(json_array(id, write_key, user_key, body, enqueued_at)) "
                + _OLDEST)
_INSERT = ("INSERT INTO outbox (upstream, write_key, user_key, body, enqueued_at)"
           " VALUES (?, ?, ?, ?, ?)")
# One statement for a whole batch: executemany would bind and step once per id, taking the GIL
# back from the event loop each time.
_DELETE = "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))"
_PROBE = "INSERT OR REPLACE INTO writable_probe (id, at) VALUES (1, ?)"
STATS_SECONDS = 5.0
SLOW_STATS_SECONDS = 0.05
_DEAD = ("INSERT INTO dead_letters (upstream, write_key, user_key, body, enqueued_at, failed_at,"
         " status, answer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_COUNT = ("INSERT INTO counters (name, count) VALUES (?, ?)"
          " ON CONFLICT(name) DO UPDATE SET count = count + excluded.count")
# Upserts whose rows are (key, n) and add n to the key's row: rows for one key may be summed.
# Other stages' statements of that kind are named by whoever opens the outbox (`additive`).
_ADDITIVE = frozenset({_COUNT})


class Outbox:
    """One SQLite file (WAL): every upstream's queue of messages, written by group commit."""

    def __init__(self, path: str, upstreams: Sequence[str], synchronous: str = "full",
                 capacity: Capacity | None = None, additive: Iterable[str] = ()) -> None:
        self.path = path
        self.capacity = capacity or Capacity(0, "reject")
        self.upstreams = tuple(upstreams)
        self.synchronous = synchronous.upper()
        self._writer = Writer(path)
        self._group = GroupCommit(self._writer, _PROBE, _ADDITIVE | frozenset(additive))
        self._reader: aiosqlite.Connection | None = None
        self._signals = {name: asyncio.Event() for name in self.upstreams}
        self._stats: tuple[float, list[outbox_stats.QueueStats]] | None = None
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
        self._group.start()
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
            await self._reader.execute_fetchall("SELECT value FROM json_each('[1]')")
        except sqlite3.OperationalError:
            raise sqlite3.DatabaseError(
                f"SQLite {sqlite3.sqlite_version} has no JSON functions; relay needs SQLite 3.38"
                " or later (or one built with JSON1)") from None
        await self.capacity.sync(self._reader)

    async def close(self) -> None:
        """Commits what is queued, then closes both connections."""
        await self._group.close()
        for conn in (self._reader, self._stats_conn):
            if conn is not None:
                await conn.close()
        self._reader = self._stats_conn = None
        await self._writer.close()

    @property
    def writable(self) -> bool:
        """False while commits fail (then every request is answered 503)."""
        return self._group.writable

    @property
    def commits(self) -> int:
        return self._group.commits

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
        await self._group.submit([*room, (_INSERT, rows), (_COUNT, list(counts.items())), *state])
        self.capacity.added(size)
        if rows:
            for event in self._signals.values():
                event.set()

    async def commit(self, statements: list[Statement]) -> None:
        """Commits `statements` (other parts' writes: the state's journal) with the next group."""
        await self._group.submit(statements)

    async def next_batch(
        self, upstream: str, max_messages: int, max_bytes: int, by_key: bool, after: int = 0
    ) -> list[Pending]:
        """The oldest messages of `upstream` with ids over `after` (all with the oldest one's
        key when `by_key`).

        The rows come back as one value, made by SQLite in a single step: fetched a row at a
        time, each row took the interpreter lock back from the event loop, and under load that
        wait (up to the 5 ms switch interval a row) made reading one batch of 500 take seconds,
        so delivery all but stopped while requests kept coming."""
        assert self._reader is not None
        where = "upstream = ? AND id > ?"
        args: tuple[Any, ...] = (upstream, after)
        if by_key:
            where += (" AND write_key = (SELECT write_key FROM outbox WHERE upstream = ?"
                      " AND id > ? ORDER BY id LIMIT 1)")
            args = (upstream, after, upstream, after)
        candidates = (*args, max_messages)
        rows = await self._rows(where, (*args, *candidates, max_bytes, *candidates, *candidates,
                                        max_bytes, max_messages))
        batch: list[Pending] = []
        size = 0
        for row in rows:
            size += len(row[3]) + 1
            if batch and size > max_bytes:
                break
            batch.append(Pending(*row))
        return batch

    async def may_read_on(self, upstream: str, batch: Sequence[Pending], by_key: bool) -> bool:
        """Whether the batch after `batch` may be read from its last id on (while it is being
        sent) without breaking a user's order. By key, a batch takes the oldest key's messages
        and passes over other keys' in between; those must go first, and reading on from its
        last id would pass them over for good (a user's later message sent before an earlier
        one). So by key, only a batch that passed over nothing may be read on from."""
        if not by_key or not batch or batch[-1].id - batch[0].id < len(batch):
            return True  # ids only grow, and these are consecutive: nothing was passed over
        assert self._reader is not None
        rows = list(await self._reader.execute_fetchall(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE upstream = ? AND id > ? AND id < ?"
            " AND write_key != ?)", (upstream, batch[0].id, batch[-1].id, batch[0].write_key)))
        return not rows[0][0]

    async def _rows(self, where: str, args: tuple[Any, ...]) -> list[list[Any]]:
        """The oldest rows `where` holds, in id order. The bodies come as one text and their
        lengths: quoted into a JSON array, each body's quotes were escaped by SQLite and
        unescaped again by orjson, a sixth of the reader's CPU per batch. Should the lengths
        not add up (a body with a NUL, which relay's ASCII JSON never holds), every row is read
        quoted."""
        assert self._reader is not None
        # Executed and fetched in one call on the reader's thread: between a cursor's execute
        # and its fetch, another read queued on this connection (drop_oldest's) would run inside
        # this statement's read transaction and miss what was committed since it began.
        found = list(await self._reader.execute_fetchall(_READ_SPLIT.format(where=where), args))
        rows: list[list[Any]] = orjson.loads(found[0][0]) if found else []
        bodies = found[0][1] if rows else ""
        at = 0
        for row in rows:  # both aggregates ran over the rows in one order
            end = at + row[3]
            row[3] = bodies[at:end]
            at = end
        if at != len(bodies):
            sql = _READ_QUOTED.format(where=where)
            found = list(await self._reader.execute_fetchall(sql, args))
            rows = orjson.loads(found[0][0]) if found else []
        rows.sort()  # SQLite does not promise an aggregate's order; ids are unique
        return rows

    async def ack(self, pending: Iterable[Pending]) -> None:
        """Removes delivered messages."""
        pending = list(pending)
        await self._group.submit([(_DELETE, [_ids(pending)])])
        self.capacity.removed({p.id: len(p.body) for p in pending})

    async def dead_letter(
        self, upstream: str, pending: Sequence[Pending], status: int, answer: str
    ) -> None:
        """Moves messages the upstream refused for good into `dead_letters`, with its answer."""
        now = time.time()
        rows = [(upstream, p.write_key, p.user_key, p.body, p.enqueued_at, now, status, answer)
                for p in pending]
        await self._group.submit([(_DEAD, rows), (_DELETE, [_ids(pending)])])
        self.capacity.removed({p.id: len(p.body) for p in pending})

    async def backlog(self, upstream: str) -> int:
        """How many messages wait for `upstream`."""
        assert self._reader is not None
        sql = "SELECT count(*) FROM outbox WHERE upstream = ?"
        rows = list(await self._reader.execute_fetchall(sql, (upstream,)))
        return int(rows[0][0]) if rows else 0

    async def stats(self) -> list[outbox_stats.QueueStats]:
        """What each upstream's queue holds, on a connection of its own so the forwarders' reads
        never wait behind it. With a large backlog the query takes a while and scrapers ask
        often: an answer that was slow to get is reused for STATS_SECONDS."""
        now = time.monotonic()
        if self._stats is None or now > self._stats[0]:
            if self._stats_conn is None:
                self._stats_conn = await aiosqlite.connect(self.path, isolation_level=None)
            fresh = await outbox_stats.stats(self._stats_conn, self.upstreams)
            took = time.monotonic() - now
            self._stats = (now + (STATS_SECONDS if took > SLOW_STATS_SECONDS else 0.0), fresh)
        return self._stats[1]

def _ids(pending: Iterable[Pending]) -> tuple[str]:
    """The ids of `pending` as the one parameter of _DELETE: a JSON array."""
    return ("[" + ",".join(str(p.id) for p in pending) + "]",)
