"""What the queue holds, per upstream: read-only questions for metrics, admin and the CLI."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiosqlite


@dataclass(frozen=True)
class QueueStats:
    """One upstream's queue: waiting messages, their bytes, the oldest one's age, dead letters."""

    upstream: str
    messages: int
    bytes: int
    oldest_age_seconds: float
    dead_letters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def stats(conn: aiosqlite.Connection, upstreams: Sequence[str]) -> list[QueueStats]:
    """The stats of each upstream in `upstreams` (and of any other the database still holds)."""
    now = time.time()
    waiting = {row[0]: row[1:] for row in await conn.execute_fetchall(
        "SELECT upstream, count(*), coalesce(sum(length(body)), 0), min(enqueued_at)"
        " FROM outbox GROUP BY upstream")}
    dead: dict[str, int] = {row[0]: row[1] for row in await conn.execute_fetchall(
        "SELECT upstream, count(*) FROM dead_letters GROUP BY upstream")}
    names = list(upstreams) + sorted((set(waiting) | set(dead)) - set(upstreams))
    out = []
    for name in names:
        count, size, oldest = waiting.get(name, (0, 0, None))
        age = max(now - oldest, 0.0) if oldest is not None else 0.0
        out.append(QueueStats(name, int(count), int(size), round(age, 3), int(dead.get(name, 0))))
    return out


def together(each: Sequence[Sequence[QueueStats]]) -> list[QueueStats]:
    """The stats of several files (workers') as one: counts and bytes added, the oldest age."""
    out: dict[str, QueueStats] = {}
    for stats_of_one in each:
        for q in stats_of_one:
            seen = out.get(q.upstream)
            out[q.upstream] = q if seen is None else QueueStats(
                q.upstream, seen.messages + q.messages, seen.bytes + q.bytes,
                max(seen.oldest_age_seconds, q.oldest_age_seconds),
                seen.dead_letters + q.dead_letters)
    return list(out.values())


async def stored_bytes(conn: aiosqlite.Connection) -> int:
    """The bytes of every waiting message, all upstreams together."""
    rows = list(await conn.execute_fetchall("SELECT coalesce(sum(length(body)), 0) FROM outbox"))
    return int(rows[0][0])
