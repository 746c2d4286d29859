"""`storage.max_bytes`: a cap on the outbox, and what happens when a request would pass it."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import aiosqlite

from relay.outbox.writer import Statement

log = logging.getLogger("relay.outbox")

WhenFull = Literal["reject", "drop_oldest"]
RESYNC_SECONDS = 30.0  # `relay queue purge` in another process changes the size behind our back
_LOG_SECONDS = 60.0
GONE_MOST = 100_000  # dropped ids remembered, so that a late ack for one frees nothing


class OutboxFull(Exception):
    """The outbox is at `storage.max_bytes` and `when_full` is reject: answer 503."""


class Capacity:
    """Keeps the bytes of waiting messages (all upstreams) under `max_bytes` (0: no cap)."""

    def __init__(self, max_bytes: int, when_full: WhenFull) -> None:
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.used = 0
        self.full = False
        self.dropped = 0
        self._synced = -RESYNC_SECONDS
        self._logged = -_LOG_SECONDS
        self._gone: set[int] = set()  # dropped to make room; an ack for them frees nothing
        # Ids removed (acked, dead-lettered) while a drop_oldest read of the oldest messages was
        # under way: that read may have seen them before their delete, and they were counted.
        self._reading = 0
        self._removed_meanwhile: list[int] = []

    async def sync(self, conn: aiosqlite.Connection) -> None:
        """Reads the true size from the database."""
        rows = list(await conn.execute_fetchall(
            "SELECT coalesce(sum(length(body)), 0) FROM outbox"))
        self.used = int(rows[0][0])
        # What was dropped stays gone: a delivery of it may still be in flight, and its ack must
        # not be subtracted from the true size just read. Only the oldest are forgotten, as a
        # bound (drops that no forwarder had read are never acked).
        if len(self._gone) > GONE_MOST:
            self._gone = set(sorted(self._gone)[-GONE_MOST:])
        self.full = bool(self.max_bytes) and self.used >= self.max_bytes
        self._synced = time.monotonic()

    async def admit(self, size: int, conn: aiosqlite.Connection) -> list[Statement]:
        """Room for `size` more bytes: nothing to do, statements deleting the oldest messages
        (drop_oldest), or OutboxFull (reject)."""
        if not self.max_bytes:
            return []
        # While full, look more often: `relay queue purge` may have made room meanwhile.
        if time.monotonic() - self._synced > (RESYNC_SECONDS / 6 if self.full else RESYNC_SECONDS):
            await self.sync(conn)
        excess = self.used + size - self.max_bytes
        if excess <= 0:
            self._below()
            return []
        if self.when_full == "reject" or size > self.max_bytes:
            self.full = True
            self._log("storage: outbox at its cap of %d bytes; answering 503 until the upstreams"
                      " catch up (storage.when_full: reject)", self.max_bytes)
            raise OutboxFull(f"the outbox holds {self.used} bytes, its cap is {self.max_bytes}")
        ids = await self._oldest_not_counted(conn, excess)
        if not ids:  # deliveries made the room while the oldest were read
            return []
        self.dropped += len(ids)
        self.used -= sum(n for _, n in ids)
        self._gone.update(i for i, _ in ids)
        self._log("storage: outbox at its cap of %d bytes; dropped the %d oldest message(s)"
                  " (%d since start; storage.when_full: drop_oldest)", self.max_bytes, len(ids),
                  self.dropped)
        return [("DELETE FROM outbox WHERE id = ?", [(i,) for i, _ in ids])]

    async def _oldest_not_counted(self, conn: aiosqlite.Connection,
                                  excess: int) -> list[tuple[int, int]]:
        """The oldest messages, less those whose bytes were already subtracted meanwhile: by an
        ack, or by another request's drop that has not committed yet."""
        start = len(self._removed_meanwhile)
        self._reading += 1
        try:
            ids = await _oldest(conn, excess)
        finally:
            self._reading -= 1
        late = set(self._removed_meanwhile[start:])
        if not self._reading:
            self._removed_meanwhile.clear()
        return [(i, n) for i, n in ids if i not in late and i not in self._gone]

    def added(self, size: int) -> None:
        self.used += size

    def removed(self, sizes: dict[int, int]) -> None:
        """Messages (id: bytes) delivered or dead-lettered leave the outbox."""
        size = sum(n for i, n in sizes.items() if i not in self._gone)
        if self._reading:
            self._removed_meanwhile.extend(sizes)
        self._gone.difference_update(sizes)
        self.used = max(self.used - size, 0)
        if self.full and self.used < self.max_bytes:
            self._below()

    def _below(self) -> None:
        """Room again: said once, as the cap was (answers are 200 again under `reject`)."""
        if self.full:
            self.full = False
            log.info("storage: outbox below its cap again (%d of %d bytes)", self.used,
                     self.max_bytes)

    def _log(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_SECONDS:
            self._logged = now
            log.warning(text, *args)


async def _oldest(conn: aiosqlite.Connection, excess: int) -> list[tuple[int, int]]:
    """The oldest messages whose bytes add up to at least `excess`."""
    found: list[tuple[int, int]] = []
    freed, after = 0, 0
    while freed < excess:
        rows = list(await conn.execute_fetchall(
            "SELECT id, length(body) FROM outbox WHERE id > ? ORDER BY id LIMIT 500", (after,)))
        if not rows:
            break
        for row_id, size in rows:
            found.append((int(row_id), int(size)))
            freed += int(size)
            if freed >= excess:
                break
        after = int(rows[-1][0])
    return found
