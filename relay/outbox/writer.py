"""The one SQLite connection that writes, in a child process of its own
(`relay.outbox.writer_child`).

A whole transaction is one request to that process: BEGIN, every statement, COMMIT. The child
has an interpreter lock of its own, so a commit's row bindings and its fsync run beside the
event loop instead of taking turns with it: on a thread of relay's process a commit under load
took about twice as long, and the loop sat idle while requests waited for it (bench/profile.md).
A request is written to the child at once, without waiting for a turn of the event loop.

The child ends when relay does, even on kill -9 (its stdin closes). Should it die while relay
runs, what was in flight fails (its requests are answered 503) and `transaction` starts a new
child, opened as the last one was.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import marshal
import os
import sqlite3
import sys
from typing import Any

from relay.outbox import writer_child

Statement = writer_child.Statement

_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (
        sqlite3.OperationalError, sqlite3.IntegrityError, sqlite3.DatabaseError,
        sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.DataError,
        sqlite3.NotSupportedError, sqlite3.InternalError, sqlite3.Error)}
END_SECONDS = 10.0


class WriterGone(sqlite3.OperationalError):
    """The writer process ended (or could not start) before it answered."""


class Writer:
    """Sends transactions to the child process that owns the connection; answers come back
    in the order the requests went."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None
        self._requests: asyncio.WriteTransport | None = None
        self._answers: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._opened: tuple[list[str], str] | None = None  # to open a new child the same way

    @property
    def alive(self) -> bool:
        """Whether a child is running to take `send`."""
        return self._answers is not None and not self._answers.done()

    async def open(self, pragmas: list[str], schema: str) -> list[str]:
        """Connects, applies `pragmas` and `schema`; returns what `PRAGMA quick_check` says."""
        await self._start()
        verdict: list[str] = await self._send(("open", pragmas, schema, True))
        self._opened = (pragmas, schema)
        return verdict

    def send(self, statements: list[Statement],
             additive: frozenset[str] = frozenset()) -> asyncio.Future[None]:
        """Every statement in one transaction, sent now: the future is done once they are
        committed together, or failed. A failure from SQLite committed nothing; WriterGone
        (the child died before it answered) may follow a commit, whose messages then go out
        twice when the SDK sends them again, as after any crash. Raises WriterGone at once with
        no child running."""
        return self._send(("transaction", statements, additive))

    async def transaction(self, statements: list[Statement],
                          additive: frozenset[str] = frozenset()) -> None:
        """`send`, starting a new child first if the last one ended."""
        if not self.alive:
            await self._end()
            await self._start()
            if self._opened is not None:
                # Checked when relay started; a writer process that died leaves SQLite's file
                # whole (a commit is all or nothing), and on a large file the check would keep
                # every request waiting for seconds.
                await self._send(("open", *self._opened, False))
        await self.send(statements, additive)

    async def close(self) -> None:
        """Closes the connection and waits for the child to end."""
        if self.alive:
            with contextlib.suppress(sqlite3.Error):
                await self._send(("close",))
        await self._end()

    def _send(self, request: tuple[Any, ...]) -> asyncio.Future[Any]:
        requests = self._requests
        if not self.alive or requests is None or requests.is_closing():
            raise WriterGone("the writer process is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        requests.writelines(writer_child.frame(request))
        return future

    async def _start(self) -> None:
        # The requests' pipe is made here rather than by the event loop (uvloop makes a socket
        # pair, whose buffer the system caps at ~200 KB), so that it can be widened: a commit
        # is written whole at once instead of topped up between the requests relay answers.
        read_end, write_end = os.pipe()
        pipe = os.fdopen(write_end, "wb", buffering=0)
        try:
            writer_child.widen(write_end)
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", writer_child.__name__, self.path,
                stdin=read_end, stdout=asyncio.subprocess.PIPE)
        except OSError as exc:
            pipe.close()
            raise WriterGone(f"cannot start the writer process: {exc}") from None
        finally:
            os.close(read_end)
        try:
            self._requests, _ = await asyncio.get_running_loop().connect_write_pipe(
                asyncio.BaseProtocol, pipe)
        except BaseException:
            pipe.close()
            await self._end()
            raise
        self._answers = asyncio.create_task(self._read_answers(self._proc), name="writer-answers")

    async def _read_answers(self, proc: asyncio.subprocess.Process) -> None:
        """Settles each waiting request with its answer, in order; at the child's end, fails
        those still waiting."""
        assert proc.stdout is not None
        size = writer_child.HEADER.size
        try:
            while True:
                (length,) = writer_child.HEADER.unpack(await proc.stdout.readexactly(size))
                answer = marshal.loads(await proc.stdout.readexactly(length))
                future = self._waiting.popleft()
                if future.done():
                    continue
                if answer[0] == "ok":
                    future.set_result(answer[1])
                else:
                    future.set_exception(
                        _ERRORS.get(answer[1], sqlite3.OperationalError)(answer[2]))
        except Exception as exc:  # ended, or (never seen) out of step: nothing may wait on
            gone = f"the writer process ended ({type(exc).__name__})"
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(WriterGone(gone))

    async def _end(self) -> None:
        """Closes the child's stdin, waits for it to end (killing one that does not), and for
        the failing of whatever still waited on it."""
        proc, self._proc = self._proc, None
        requests, self._requests = self._requests, None
        if requests is not None:
            requests.close()
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), END_SECONDS)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._answers is not None:
            await self._answers
            self._answers = None
