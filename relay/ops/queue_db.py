"""What the queue commands share: the connection to relay's database, short transactions, the
dead-letter selection, and the errors operators are shown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from relay import clock

CHUNK = 500  # rows per transaction
BUSY_MS = 5000  # how long a write waits for relay's own commit to finish

_AGE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DEAD = ("SELECT id, upstream, write_key, user_key, body, enqueued_at, failed_at, status, answer"
        " FROM dead_letters")


class QueueError(Exception):
    """A problem the operator must be told about: no database, an unknown upstream, a bad time."""


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


@contextlib.asynccontextmanager
async def connect(path: str) -> AsyncIterator[aiosqlite.Connection]:
    """A connection to an existing relay database (never creates one)."""
    conn = await aiosqlite.connect(uri(path), uri=True, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        tables = {row[0] for row in await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"outbox", "dead_letters"} <= tables:
            raise QueueError(f"{path} holds no relay queue (no outbox table)")
        yield conn
    finally:
        await conn.close()


def uri(path: str) -> str:
    """The database as an SQLite URI that opens it read-write and never creates it."""
    if not os.path.isfile(path):
        raise QueueError(f"no database at {path}: relay has not run with this storage.path")
    return Path(path).absolute().as_uri() + "?mode=rw"


@contextlib.asynccontextmanager
async def transaction(conn: aiosqlite.Connection) -> AsyncIterator[None]:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


def dead_filter(upstream: str | None, since: str | None) -> tuple[str, list[Any]]:
    moment = None if since is None else parse_since(since)
    wanted = [("upstream = ?", upstream), ("failed_at >= ?", moment)]
    chosen = [(sql, arg) for sql, arg in wanted if arg is not None]
    return " AND ".join(["1", *(sql for sql, _ in chosen)]), [arg for _, arg in chosen]


async def scalar(conn: aiosqlite.Connection, sql: str, args: Any) -> int:
    rows = list(await conn.execute_fetchall(sql, args))
    return int(rows[0][0])


def marks(ids: Sequence[int]) -> str:
    return ", ".join("?" * len(ids))


def loads(body: str) -> dict[str, Any] | None:
    try:
        message = json.loads(body)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
