"""User state shared by several relays: this relay's SQLite state, kept as with one relay, plus
what the shared Redis says about each user a request is about, fetched before its rules run.

Each change the rules make is also recorded as an op (`["g", ref, group, at]`, `["i", ref,
reason, at]`, `["l", anonymousId, userId]`, `["m", ref, group, at]`, `["t", ref, n]`) in the
`state_journal` table, in the same transaction as the messages that caused it; `relay.state.shipper`
sends the journal to Redis, so a crash, or Redis being away, loses none of it. What Redis says
is merged into the cache as the script merges writes (the later event time wins, an internal
verdict stays), so a fetch never undoes what this relay knows and has not yet sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

from relay.state.model import MISSING, Cache, Membership, wins
from relay.state.redis_store import Fetched, RedisStore, dumps
from relay.state.sqlite import SqliteState

JOURNAL = """
CREATE TABLE IF NOT EXISTS state_journal (id INTEGER PRIMARY KEY AUTOINCREMENT, ops TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS held (id INTEGER PRIMARY KEY AUTOINCREMENT, write_key TEXT NOT NULL,
    route TEXT NOT NULL, refs TEXT NOT NULL, body TEXT NOT NULL);
"""
_JOURNAL = "INSERT INTO state_journal (ops) VALUES (?)"
_HOLD = "INSERT INTO held (write_key, route, refs, body) VALUES (?, ?, ?, ?)"


class SharedState(SqliteState):
    """SqliteState whose changes are journaled for Redis and whose reads are refreshed from it
    (`prefetch`); when Redis does not answer, it decides as one relay would."""

    def __init__(self, path: str, store: RedisStore, cache_size: int = 100_000,
                 cache_ms: int = 1000, hold: bool = False) -> None:
        super().__init__(path, cache_size)
        self.store = store
        self.hold = hold  # state.on_unavailable: hold (`relay.ingest.held`)
        self.held_refs: set[str] = set()  # users with messages held
        self.cache_seconds = cache_ms / 1000
        self._ops: list[list[Any]] = []
        self._fetched: Cache[float] = Cache(cache_size)  # ref -> when Redis last told of it
        self.shipped: asyncio.Event | None = None  # the shipper's, set once a journal row commits

    async def open(self) -> None:
        await super().open()
        assert self._conn is not None
        await self._conn.executescript(JOURNAL)
        for (refs,) in await self._conn.execute_fetchall("SELECT refs FROM held"):
            self.held_refs.update(json.loads(refs))

    def hold_message(self, key: str, route: str, refs: list[str], body: str) -> None:
        """Holds a message (stamped, as stored before the rules) with the request's commit."""
        self.held_refs.update(refs)
        self._pending.append((_HOLD, [(key, route, dumps(refs), body)]))

    def _record(self, op: list[Any]) -> None:
        self._ops.append(op)

    def drain(self) -> list[Any]:
        ops = self._ops
        ops.extend(["t", ref, n] for ref, n in self._ungrouped.items())
        pending = super().drain()
        if ops:
            self._ops = []
            pending.append((_JOURNAL, [(dumps(ops),)]))
        return pending

    def committed(self) -> None:
        if self.shipped is not None:
            self.shipped.set()

    def forget(self) -> None:
        super().forget()
        self._ops = []  # their commit failed: what they recorded never happened
        self._fetched.clear()

    async def prefetch(self, refs: Iterable[str]) -> bool:
        """Brings what Redis holds about `refs` into the cache, in one call for those not
        fetched within the cache's lifetime; False when Redis could not say (then the rules go
        on from what this relay knows)."""
        now = time.monotonic()
        fetched = self._fetched
        stale = [ref for ref in dict.fromkeys(refs)
                 if now - fetched.get(ref, -1e9) > self.cache_seconds]
        if not stale:
            return True
        found = await self.store.fetch(stale)
        if found is None:
            return False
        for ref, value in found.items():
            self.merge(ref, value)
            fetched.remember(ref, now)
        return True

    def merge(self, ref: str, value: Fetched) -> None:
        """What Redis holds about `ref`, taken into the cache the way Redis takes writes."""
        if value.group is not None and value.at is not None:
            theirs = Membership(value.group, value.at)
            ours = self._groups.get(ref, MISSING)
            if ours is MISSING or ours is None or wins(theirs.group_id, theirs.at, ours):
                self._groups.remember(ref, theirs)
        elif ref not in self._groups:
            self._groups.remember(ref, None)
        if value.internal is not None:
            self._internal.remember(ref, True)
        elif ref not in self._internal:
            self._internal.remember(ref, False)

