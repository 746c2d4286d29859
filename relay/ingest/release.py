"""Runs the messages held while Redis did not answer (`relay.ingest.held`) through the rules once it
answers again: oldest first, each commit of theirs deleting what it released."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import orjson

from relay.ingest import segment
from relay.ingest.receiver import Ingest, Seen
from relay.metrics import Metrics
from relay.outbox.store import Outbox
from relay.pipeline import Message
from relay.state.redis_store import RedisStore
from relay.state.shared import SharedState

RELEASE_SECONDS = 0.5
RELEASE_ROWS = 500
# After Redis was found empty, how long every relay has to send its state again before what is
# held is run on what Redis says (a staff verdict may be known to another relay only).
REFILL_SECONDS = 10.0


class Releaser:
    """Runs for as long as relay does."""

    def __init__(self, state: SharedState, store: RedisStore, outbox: Outbox,
                 ingest: Callable[[], Ingest], metrics: Metrics) -> None:
        self.state = state
        self.store = store
        self.outbox = outbox
        self.ingest = ingest  # the current one: rules are replaced on reload
        self.metrics = metrics

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_SECONDS)
            if self.state.held_refs and self.store.up \
                    and self.store.epoch_age() >= REFILL_SECONDS:
                await self.release()

    async def release(self) -> None:
        """Releases what is held, oldest first, while Redis answers."""
        conn = self.state.connection
        while rows := list(await conn.execute_fetchall(
                "SELECT id, write_key, route, refs, body FROM held ORDER BY id LIMIT ?",
                (RELEASE_ROWS,))):
            refs = [ref for row in rows for ref in json.loads(row[3])]
            if not await self.state.prefetch(refs):
                return  # Redis went again: the rest waits
            for (key, route), run in itertools.groupby(rows, lambda row: (row[1], row[2])):
                await self._release(str(key), str(route), [tuple(row) for row in run])
        self.state.held_refs.clear()

    async def _release(self, key: str, route: str, rows: list[tuple[Any, ...]]) -> None:
        ingest = self.ingest()
        ready: list[tuple[Message, str | None]] = [
            (orjson.loads(row[4]), row[4]) for row in rows]
        seen = Seen()
        budget = segment.Budget(sum(len(row[4]) for row in rows))
        entries = await ingest.rules(ready, route, budget, seen)
        counts, tally = seen.totals()
        ids = "[" + ",".join(str(row[0]) for row in rows) + "]"
        done = ("DELETE FROM held WHERE id IN (SELECT value FROM json_each(?))", [(ids,)])
        try:
            await self.outbox.put(key, entries, counts, [*self.state.drain(), done])
        except Exception:
            self.state.forget()
            raise
        self.state.committed()
        self.metrics.record(tally)
