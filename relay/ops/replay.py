"""`relay queue dead replay`: dead letters through the current rules, back into the outbox."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from relay.config.model import Config
from relay.ingest import segment
from relay.metrics import Metrics
from relay.ops import queue
from relay.ops import queue_db as db
from relay.ops.progress import Progress, silent
from relay.outbox import stats as outbox_stats
from relay.pipeline import identity
from relay.pipeline.runner import Pipeline, RuleContext
from relay.state.redis_store import RedisStore
from relay.state.shared import SharedState
from relay.state.sqlite import SqliteState

_INSERT = ("INSERT INTO outbox (upstream, write_key, user_key, body, enqueued_at)"
           " VALUES (?, ?, ?, ?, ?)")
_COUNT = ("INSERT INTO counters (name, count) VALUES (?, ?)"
          " ON CONFLICT(name) DO UPDATE SET count = count + excluded.count")


@dataclass
class Replayed:
    """What a replay did: re-queued per upstream, dropped per rule, and what it left alone."""

    selected: int = 0
    requeued: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0
    unknown_upstreams: dict[str, int] = field(default_factory=dict)
    full: bool = False  # stopped: the outbox would pass storage.max_bytes


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
        raise db.QueueError(f"upstream {upstream!r} is not in the config ({', '.join(names)})")
    result = Replayed()
    for _, path in queue.files(config):  # each worker's dead letters back into its own outbox
        if not result.full:
            await _replay_file(config, path, upstream, since, result=result, progress=progress)
    return result


async def _replay_file(config: Config, path: str, upstream: str | None, since: str | None, *,
                       result: Replayed, progress: Progress) -> None:
    names = [u.name for u in config.upstreams]
    where, args = db.dead_filter(upstream, since)
    marks = ", ".join("?" * len(names))
    async with db.connect(path) as conn:
        unknown = await conn.execute_fetchall(
            f"SELECT upstream, count(*) FROM dead_letters WHERE {where}"
            f" AND upstream NOT IN ({marks}) GROUP BY upstream ORDER BY upstream",
            [*args, *names])
        result.unknown_upstreams.update({str(name): int(n) for name, n in unknown})
        where, args = f"{where} AND upstream IN ({marks})", [*args, *names]
        selected = await db.scalar(conn, f"SELECT count(*) FROM dead_letters WHERE {where}", args)
        result.selected += selected
        state = _state(config, path)
        await state.open()
        try:
            replay = _Replay(conn, Pipeline(config.rules, config.on_rule_error), state,
                             config.storage.max_bytes, result)
            sql = f"{db.DEAD} WHERE id > ? AND {where} ORDER BY id LIMIT {db.CHUNK}"
            last = done = 0
            progress(0, selected)
            while not result.full and (rows := await conn.execute_fetchall(sql, [last, *args])):
                rows = list(rows)
                last, done = rows[-1][0], done + len(rows)
                await replay.chunk(rows)
                progress(done, selected)
        finally:
            await state.close()
            if isinstance(state, SharedState):
                await state.store.close()


def _state(config: Config, path: str) -> SqliteState:
    """The rules' state for a replay into `path`: with the redis backend, what Redis holds is
    read before each chunk, and what the rules change goes into the file's journal, which the
    running relay sends on."""
    if config.state.backend != "redis":
        return SqliteState(path, config.storage.cache_size)
    store = RedisStore(config.state, Metrics())
    return SharedState(path, store, config.storage.cache_size, config.state.cache_ms)


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
        if isinstance(self.state, SharedState):  # without an answer: decided from this file's
            await self.state.prefetch(  # own state, as relay does
                [ref for row in rows for ref in identity.refs(db.loads(row[4]) or {})])
        kept: dict[int, tuple[str, str, str, str]] = {}
        dropped: dict[int, str] = {}
        for row in rows:
            message = db.loads(row[4])
            if message is None:
                self.result.unreadable += 1  # left where it is
                continue
            outcome = await self.pipeline.run(message, ctx)
            if outcome.message is None:
                dropped[row[0]] = str(outcome.dropped_by)
            else:
                final = outcome.message
                kept[row[0]] = (row[1], row[2], segment.user_key(final), segment.dumps(final))
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
        async with db.transaction(self.conn):
            size = sum(len(row[3]) for row in kept.values())
            if self.max_bytes and size and (
                    await outbox_stats.stored_bytes(self.conn) + size > self.max_bytes):
                raise _Full
            # Only what this transaction deleted is re-queued: a concurrent purge or replay wins.
            gone = {row[0] for row in await self.conn.execute_fetchall(
                f"DELETE FROM dead_letters WHERE id IN ({db.marks(ids)}) RETURNING id", ids)}
            now = time.time()
            await self.conn.executemany(_INSERT, [(*kept[i], now) for i in kept if i in gone])
            drops = Counter(rule for i, rule in dropped.items() if i in gone)
            await self.conn.executemany(_COUNT, [(f"dropped.{r}", n) for r, n in drops.items()])
            for sql, params in self.state.drain():
                await self.conn.executemany(sql, params)
        self.result.requeued.update(kept[i][0] for i in kept if i in gone)
        self.result.dropped.update(drops)
