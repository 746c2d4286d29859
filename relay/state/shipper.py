"""Sends the state journal to Redis, in order, and each row only once it is committed; refills
Redis from this relay's own state when Redis has lost its data.

A journal row is deleted only after Redis applied it, so a crash between the two sends it again:
every op is one Redis can take twice with the same result, but for the counts of tracks without
a group, which the report may then overstate by a commit's worth. While Redis does not answer the
journal grows and is sent, oldest first, when it does; an empty call every PROBE_SECONDS is how
the store learns that Redis is back and whether it still holds its data (`epoch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from relay.outbox.writer import Statement
from relay.state.redis_store import FAILURES, RedisStore, dumps
from relay.state.shared import SharedState

log = logging.getLogger("relay.state")

PROBE_SECONDS = 1.0
# After a commit wakes it, how long the shipper lets more commits' journal rows gather before
# it sends them: one call for many commits (a call per commit doubled the CPU a single event
# cost relay); the most another relay waits for a change, beside the cache's lifetime.
GATHER_SECONDS = 0.05
RETRY_SECONDS = 1.0
MAX_CALL_BYTES = 256 * 1024  # of ops in one call: a Lua script holds Redis while it runs
REFILL_ROWS = 2000

Commit = Callable[[list[Statement]], Awaitable[None]]

# This relay's own state, as ops, table by table (`refill`).
_REFILL: tuple[tuple[str, Callable[[Sequence[Any]], list[Any]]], ...] = (
    ("SELECT ref, group_id, at FROM user_groups WHERE rowid > ? ORDER BY rowid LIMIT ?",
     lambda row: ["g", row[0], row[1], row[2]]),
    ("SELECT ref, reason, first_seen FROM internal_users WHERE rowid > ? ORDER BY rowid LIMIT ?",
     lambda row: ["i", row[0], row[1], row[2]]),
    ("SELECT anonymous_id, user_id FROM id_links WHERE rowid > ? ORDER BY rowid LIMIT ?",
     lambda row: ["l", row[0], row[1]]),
    ("SELECT ref, group_id, last_seen FROM group_members WHERE rowid > ? ORDER BY rowid LIMIT ?",
     lambda row: ["m", row[0], row[1], row[2]]),
    ("SELECT ref, count FROM ungrouped_tracks WHERE rowid > ? ORDER BY rowid LIMIT ?",
     lambda row: ["t", row[0], row[1]]),
)


class Shipper:
    """Runs for as long as relay does (`run`); `wake` after each commit."""

    def __init__(self, state: SharedState, store: RedisStore, commit: Commit) -> None:
        self.state = state
        self.store = store
        self.commit = commit
        self.wake = asyncio.Event()

    async def run(self) -> None:
        epoch = await self._remembered()
        first = True
        while True:
            if not first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), PROBE_SECONDS)
                await asyncio.sleep(GATHER_SECONDS)
            first = False
            self.wake.clear()
            try:
                shipped = await self.ship_all()
                # An empty call when nothing was sent: the probe, and the epoch as it is now.
                said = self.store.epoch if shipped else await self.store.apply("[]")
                if said != epoch:
                    await self._refill(said, epoch)
                    epoch = said
            except FAILURES as exc:
                self.store.went_down(exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def ship_all(self) -> bool:
        """Sends the whole journal; whether there was any. Raises when Redis does not take it
        (what was not sent stays in the journal)."""
        shipped = False
        while await self._ship_some():
            shipped = True
        return shipped

    async def _ship_some(self) -> int:
        """Sends the oldest journal rows (up to MAX_CALL_BYTES) in one call and deletes them;
        how many were sent (0: the journal is empty)."""
        rows = await self._journal()
        if not rows:
            return 0
        ops = ",".join(body[1:-1] for _, body in rows if body != "[]")
        await self.store.apply(f"[{ops}]")
        await self.commit([("DELETE FROM state_journal WHERE id <= ?", [(rows[-1][0],)])])
        return len(rows)

    async def _journal(self) -> list[tuple[int, str]]:
        conn = self.state.connection
        found = await conn.execute_fetchall(
            "SELECT id, ops FROM state_journal ORDER BY id LIMIT 500")
        rows: list[tuple[int, str]] = []
        size = 0
        for row_id, body in found:
            size += len(body)
            if rows and size > MAX_CALL_BYTES:
                break
            rows.append((row_id, body))
        return rows

    async def _refill(self, said: str | None, known: str | None) -> None:
        """Redis holds another epoch than this relay last saw: it was emptied (or this relay
        never sent to it). Everything this relay knows is sent again, then the epoch kept."""
        if known is not None:
            log.warning("state: Redis lost its data (epoch %s, was %s); sending this relay's"
                        " state again", said, known)
        conn = self.state.connection
        sent = 0
        for sql, op in _REFILL:
            after = 0
            while rows := list(await conn.execute_fetchall(
                    sql.replace("SELECT ", "SELECT rowid, ", 1), (after, REFILL_ROWS))):
                after = rows[-1][0]
                await self.store.apply(dumps([op(row[1:]) for row in rows]))
                sent += len(rows)
        await self.commit([("INSERT OR REPLACE INTO state_meta (key, value) VALUES (?, ?)",
                            [("epoch", said or "")])])
        if sent:
            log.info("state: sent %d record(s) of this relay's state to Redis", sent)

    async def _remembered(self) -> str | None:
        rows = list(await self.state.connection.execute_fetchall(
            "SELECT value FROM state_meta WHERE key = 'epoch'"))
        return str(rows[0][0]) if rows and rows[0][0] else None
