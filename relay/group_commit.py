"""Group commit: the writes queued while one transaction runs all go into the next, so that one
fsync and one hop to the writer thread serve every request waiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from relay.writer import Statement, Writer

log = logging.getLogger("relay.outbox")

PROBE_SECONDS = 1.0
# Under load (a commit ended less than BUSY_SECONDS ago) the writer waits GATHER_SECONDS before
# the next one, so that more requests share it: a commit's fsync and thread hop cost more CPU
# than its rows (bench/profile.md). An idle relay commits at once.
BUSY_SECONDS = 0.005
GATHER_SECONDS = 0.001

Op = tuple[list[Statement], "asyncio.Future[None]"]


class StorageError(Exception):
    """SQLite could not commit: the request must not be answered 200."""


class GroupCommit:
    """One task commits every queued write in one transaction. While a commit fails, `writable`
    is False and the task tries `probe` every PROBE_SECONDS until one succeeds."""

    def __init__(self, writer: Writer, probe: str, additive: frozenset[str]) -> None:
        self.writer = writer
        self.probe = probe  # SQL taking one parameter, the time: a harmless write
        self.additive = additive  # upserts whose rows are (key, n), adding n to the key's row
        self.writable = False
        self.commits = 0
        self._committed_at = 0.0  # time.monotonic() when the last commit ended
        self._ops: list[Op] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self.writable = True
        self._task = asyncio.create_task(self._write_loop(), name="outbox-writer")

    async def close(self) -> None:
        """Commits what is queued, then stops."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None

    async def submit(self, statements: list[Statement]) -> None:
        """Returns once `statements` are committed; raises StorageError if they cannot be."""
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
                ops = [([(self.probe, [(time.time(),)])], probe)]
            if ops:
                await self._commit(ops)
            if self._closing and not self._ops:
                return

    async def _commit(self, ops: list[Op]) -> None:
        try:
            # Every queued write in one transaction, so one fsync serves them all.
            await self.writer.transaction(merged((s for st, _ in ops for s in st), self.additive))
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


def merged(statements: Iterable[Statement], additive: frozenset[str]) -> list[Statement]:
    """One executemany per SQL text (in the order each first appears, its rows in their order)
    instead of one per request, and the rows of `additive` upserts summed by key first. Writes of
    different SQL texts must commute: in relay, outbox rows are only inserted with fresh ids
    (AUTOINCREMENT) or deleted by id, and every other table is written by one SQL text alone."""
    by_sql: dict[str, list[tuple[Any, ...]]] = {}
    for sql, rows in statements:
        if rows:
            by_sql.setdefault(sql, []).extend(rows)
    for sql in additive & by_sql.keys():
        sums: dict[Any, int] = {}
        for key, n in by_sql[sql]:
            sums[key] = sums.get(key, 0) + n
        by_sql[sql] = list(sums.items())
    return list(by_sql.items())
