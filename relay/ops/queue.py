"""The queue operations for operators: stats, dead letters (list, show), purging a user; replay
is in replay.py.

Each function opens its own connection to the config's database, so they work while relay runs
(SQLite WAL: readers never wait, and each write is a short transaction of at most CHUNK rows, so
relay's own commits wait milliseconds, not the length of the whole run).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from relay import clock
from relay.config.model import Config
from relay.logs import mask
from relay.ops import worker_files
from relay.ops.admin_url import admin_url
from relay.ops.progress import Progress, silent
from relay.ops.queue_db import (
    CHUNK,
    DEAD,
    QueueError,
    connect,
    dead_filter,
    loads,
    marks,
    scalar,
    transaction,
)
from relay.outbox import stats as outbox_stats
from relay.outbox.stats import QueueStats

# A message of the user: by the column the outbox orders by, or by either id in its body.
_USER = ("(user_key = :user OR CASE WHEN json_valid(body) THEN"
         " CAST(json_extract(body, '$.userId') AS TEXT) = :user"
         " OR CAST(json_extract(body, '$.anonymousId') AS TEXT) = :user END)")


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as operators see it: the write key masked, the message read; `worker`
    is whose file holds it (1 unless relay runs several)."""

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
    worker: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        """The id operators give `dead show`: `ID`, or `WORKER:ID` for a worker after the
        first."""
        return str(self.id) if self.worker == 1 else f"{self.worker}:{self.id}"


@dataclass(frozen=True)
class DeadList:
    """The dead letters selected (at most the limit asked for) and how many there are in all."""

    letters: list[DeadLetter]
    total: int


@dataclass
class Purged:
    """What a purge removed, per upstream."""

    messages: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)


async def stats(config: Config) -> list[QueueStats]:
    """Each upstream's queue: waiting messages, bytes, the oldest one's age, dead letters (with
    workers, of all their files together)."""
    names = [u.name for u in config.upstreams]
    each: list[list[QueueStats]] = []
    for _, path in files(config):
        async with connect(path) as conn:
            each.append(await outbox_stats.stats(conn, names))
    return outbox_stats.together(each)


async def held(config: Config) -> int:
    """Messages held with their rules still to run (`state.on_unavailable: hold` while Redis
    did not answer), of every worker's file."""
    total = 0
    for _, path in files(config):
        async with connect(path) as conn:
            if await scalar(conn, "SELECT count(*) FROM sqlite_master WHERE name = 'held'", ()):
                total += await scalar(conn, "SELECT count(*) FROM held", ())
    return total


async def paused(config: Config) -> dict[str, bool] | None:
    """Which upstreams the running relay has paused, from its GET /admin/queue; None when
    `admin.token` is empty or relay does not answer at `admin.listen` (else `listen`)."""
    if not config.admin.token:
        return None
    url = admin_url(config, "/admin/queue")
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
    """The oldest `limit` dead letters of `upstream` (else all) that failed since `since`,
    worker by worker."""
    where, args = dead_filter(upstream, since)
    letters: list[DeadLetter] = []
    total = 0
    for worker, path in files(config):
        async with connect(path) as conn:
            total += await scalar(conn, f"SELECT count(*) FROM dead_letters WHERE {where}", args)
            rows = await conn.execute_fetchall(
                f"{DEAD} WHERE {where} ORDER BY id LIMIT ?", [*args, limit - len(letters)])
        letters += [_letter(row, with_message=False, worker=worker) for row in rows]
    return DeadList(letters[:limit], total)


async def dead_show(config: Config, label: str) -> DeadLetter | None:
    """One dead letter (`ID`, or `WORKER:ID`) with its whole message, or None when there is no
    such one."""
    worker, _, dead_id = label.rpartition(":")
    number = int(worker) if worker.isdigit() else 1
    found = dict(files(config)).get(number)
    if not dead_id.isdigit() or (worker and not worker.isdigit()) or found is None:
        return None
    async with connect(found) as conn:
        rows = list(await conn.execute_fetchall(f"{DEAD} WHERE id = ?", (int(dead_id),)))
    return _letter(rows[0], with_message=True, worker=number) if rows else None


def files(config: Config) -> list[tuple[int, str]]:
    """(worker, file) of each worker's file that exists; worker 1's whether or not (so that a
    missing one is said to be missing, as for any command)."""
    return [(w, p) for w, p in worker_files.paths(config) if w == 1 or os.path.exists(p)]


async def purge_user(config: Config, user_id: str, progress: Progress = silent) -> Purged:
    """Deletes every waiting message and dead letter whose userId or anonymousId is `user_id`.

    A batch the forwarder is sending at that moment can still arrive at the vendor.
    """
    if not user_id:
        raise QueueError("the user id must not be empty")
    result = Purged()
    for _, path in files(config):
        async with connect(path) as conn:
            await _purge(conn, user_id, result, progress)
    return result


async def _purge(conn: Any, user_id: str, result: Purged, progress: Progress) -> None:
    await conn.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left
    found = {"user": user_id}
    total = 0
    for table in ("outbox", "dead_letters"):
        total += await scalar(conn, f"SELECT count(*) FROM {table} WHERE {_USER}", found)
    progress(0, total)
    done = 0
    for table, removed in (("outbox", result.messages), ("dead_letters", result.dead_letters)):
        sql = f"SELECT id FROM {table} WHERE id > :after AND {_USER} ORDER BY id LIMIT {CHUNK}"
        last = 0
        while ids := [int(row[0]) for row in await conn.execute_fetchall(
                sql, {**found, "after": last})]:
            last, done = ids[-1], done + len(ids)
            async with transaction(conn):
                gone = await conn.execute_fetchall(
                    f"DELETE FROM {table} WHERE id IN ({marks(ids)}) RETURNING upstream", ids)
            removed.update(str(row[0]) for row in gone)
            progress(done, total)


def _letter(row: Sequence[Any], with_message: bool, worker: int = 1) -> DeadLetter:
    dead_id, upstream, key, user, body, enqueued, failed, status, answer = row
    message = loads(body) or {}

    def said(name: str) -> str | None:
        return None if message.get(name) is None else str(message[name])

    return DeadLetter(dead_id, upstream, mask(key), user, said("messageId"), said("type"),
                      said("event"), iso(enqueued), iso(failed), status, answer,
                      message if with_message else None, worker)


def iso(moment: float) -> str:
    """A Unix time as an ISO-8601 UTC time."""
    return clock.iso(clock.datetime_of(moment))

