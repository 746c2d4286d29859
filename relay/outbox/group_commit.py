"""Group commit: the writes queued while one transaction runs all go into the next, so that one
fsync and one request to the writer serve every request waiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from relay.outbox.writer import Statement, Writer

log = logging.getLogger("relay.outbox")

PROBE_SECONDS = 1.0

Op = tuple[list[Statement], "asyncio.Future[None]"]


class StorageError(Exception):
    """SQLite could not commit: the request must not be answered 200."""


class GroupCommit:
    """At most one transaction in flight; what is queued meanwhile goes in the next one, sent
    as soon as the last is answered (by the callback that settles it, not a later turn of the
    event loop: a loop busy with requests would otherwise leave the writer idle).

    While a commit fails, `writable` is False and a task tries again (what is queued, else
    `probe`) every PROBE_SECONDS, or sooner when a request comes, until one succeeds."""

    def __init__(self, writer: Writer, probe: str, additive: frozenset[str]) -> None:
        self.writer = writer
        self.probe = probe  # SQL taking one parameter, the time: a harmless write
        self.additive = additive  # upserts whose rows are (key, n), adding n to the key's row
        self.writable = False
        self.commits = 0
        self._ops: list[Op] = []
        self._in_flight: asyncio.Future[None] | None = None
        self._gathering: asyncio.Handle | None = None
        self._wake = asyncio.Event()
        self._recovery: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

    def start(self) -> None:
        self.writable = True
        self._started = True

    async def close(self) -> None:
        """Commits what is queued, then stops."""
        if not self._started or self._closing:
            return
        self._closing = True
        while self._in_flight is not None or self._ops or self._recovery is not None:
            if self._gathering is not None:
                self._gathering.cancel()
                self._gathering = None
                self._send()
            waited = self._in_flight or self._recovery
            if waited is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(waited)
            elif self._ops:
                self._send()
            # An answered commit is settled by a callback of the loop's next turn; awaiting a
            # future that is already done does not yield, so without this the loop spun for ever.
            await asyncio.sleep(0)
        self._fail(self._ops, StorageError("storage is closed"))
        self._ops = []

    async def submit(self, statements: list[Statement]) -> None:
        """Returns once `statements` are committed; raises StorageError if they cannot be."""
        if not self._started or self._closing:
            raise StorageError("storage is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.append((statements, future))
        self._next()
        await future

    def _next(self) -> None:
        """Sends what is queued once the event loop has run what is ready now (the other
        requests read in the same turn join this commit at no cost in time), or not yet, while
        one is in flight (what comes meanwhile goes in the next)."""
        if not self._ops or self._in_flight is not None or self._gathering is not None:
            return
        if not self.writable:
            self._wake.set()
            return
        self._gathering = asyncio.get_running_loop().call_soon(self._gathered)

    def _gathered(self) -> None:
        self._gathering = None
        self._send()

    def _send(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        try:
            sent = self.writer.send(self._statements(ops), self.additive)
        except Exception as exc:  # the writer gone, or rows it cannot take: none may hang
            self._failed(ops, exc)
            return
        self._in_flight = sent
        sent.add_done_callback(lambda done: self._settled(ops, done))

    def _settled(self, ops: list[Op], done: asyncio.Future[None]) -> None:
        self._in_flight = None
        exc = done.exception()
        if exc is None:
            self._succeeded(ops)
        else:
            self._failed(ops, exc)
        self._next()

    @staticmethod
    def _statements(ops: list[Op]) -> list[Statement]:
        """The ops' statements in order; the writer merges them (`writer_child.merged`), in
        its own process."""
        return [statement for statements, _ in ops for statement in statements]

    def _succeeded(self, ops: list[Op]) -> None:
        if not self.writable:
            log.info("storage: writable again")
        self.writable = True
        self.commits += 1
        for _, future in ops:
            if not future.done():
                future.set_result(None)

    def _failed(self, ops: list[Op], exc: BaseException) -> None:
        """Whatever went wrong, the requests waiting must not hang: each gets a StorageError,
        and the recovery task takes over until a commit succeeds again."""
        if self.writable:
            log.error("storage: cannot commit (%s); answering 503 until it can", exc)
        self.writable = False
        self._fail(ops, StorageError(str(exc)))
        if self._recovery is None and not self._closing:
            self._recovery = asyncio.create_task(self._recover(), name="outbox-recovery")

    @staticmethod
    def _fail(ops: list[Op], error: StorageError) -> None:
        for _, future in ops:
            if not future.done():
                future.set_exception(error)

    async def _recover(self) -> None:
        """Tries what is queued, else `probe`, until a commit succeeds; nothing may arrive while
        /readyz says not ready, so it finds out by itself when the disk can be written again.
        Each try may start a new writer process."""
        try:
            while not self.writable:
                self._wake.clear()
                if not self._ops and not self._closing:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), PROBE_SECONDS)
                ops, self._ops = self._ops, []
                statements = self._statements(ops) if ops else [(self.probe, [(time.time(),)])]
                try:
                    await self.writer.transaction(statements, self.additive)
                except Exception as exc:
                    self._fail(ops, StorageError(str(exc)))
                    if self._closing:
                        return
                    continue
                self._succeeded(ops)
        finally:
            self._recovery = None
        self._next()
