"""The process that owns relay's one writing SQLite connection (`relay.outbox.writer` starts it).

It runs apart from relay's own process so that binding rows, stepping statements and waiting
for fsync never take the interpreter lock from the event loop, nor wait for it: with the
connection on a thread of relay's own, a commit under load waited for the loop to let go of the
lock after every row.

It reads framed requests on stdin and answers each on the stdout it was started with: a frame is
a 4-byte big-endian length and a value in `marshal`'s format (both ends run the same
interpreter, and it is about twice as fast as pickle for rows of strings and numbers).
Requests: `("open", pragmas, schema, check)`, `("transaction", [(sql, rows), ...], additive)`,
`("close",)`. Answers: `("ok", value)` or `("error", class name, message)`. It ends when stdin
ends (relay stopped or was killed), so it never outlives relay, and it ignores SIGINT and
SIGTERM, which a terminal or a service manager may send to relay's whole process group: relay
commits what is queued and then closes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
import signal
import sqlite3
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

Statement = tuple[str, list[tuple[Any, ...]]]
HEADER = struct.Struct(">I")
# A commit under load is hundreds of kilobytes; through a narrower pipe relay could only top it
# up between two of the requests it was busy answering, and the commit waited for that. relay
# widens the pipe it writes requests into (`widen`) as far as the system allows, up to this.
PIPE_BYTES = 4 * 1024 * 1024


def read_frame(stream: IO[bytes]) -> Any:
    """The next request, or None at the end of input (a frame cut short is no request)."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return marshal.loads(body)


def frame(value: Any) -> tuple[bytes, bytes]:
    """`value` as a frame: its head and its body, apart (a commit's body is hundreds of
    kilobytes, not to be copied once more only to put four bytes before it)."""
    body = marshal.dumps(value)
    return HEADER.pack(len(body)), body


class Connection:
    """The writing connection and the requests it serves."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def serve(self, request: tuple[Any, ...]) -> Any:
        kind = request[0]
        if kind == "transaction":
            return self.transaction(merged(request[1], request[2]))
        if kind == "open":
            return self.open(request[1], request[2], request[3])
        if kind == "close":
            return self.close()
        raise ValueError(f"unknown request {kind!r}")

    def open(self, pragmas: list[str], schema: str, check: bool) -> list[str]:
        """Connects, applies `pragmas` and `schema`; with `check`, what `PRAGMA quick_check`
        says (else nothing)."""
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        for pragma in pragmas:
            self.conn.execute(pragma)
        self.conn.executescript(schema)
        if not check:
            return []
        return [str(row[0]) for row in self.conn.execute("PRAGMA quick_check")]

    def transaction(self, statements: list[Statement]) -> None:
        """Every statement in one transaction: committed together, or not at all."""
        conn = self.conn
        if conn is None:
            raise sqlite3.ProgrammingError("the database is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


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


def widen(fd: int) -> None:
    """The pipe on `fd` made as large as PIPE_BYTES, or as the system allows."""
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        limit = 1024 * 1024
    with contextlib.suppress(OSError, AttributeError):  # not a pipe, or not Linux
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(PIPE_BYTES, limit))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers go out on a private copy of stdout; fd 1 becomes stderr, so that nothing else
    # written to stdout can ever be read as an answer.
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    connection = Connection(sys.argv[1])
    while (request := read_frame(requests)) is not None:
        try:
            answer: tuple[Any, ...] = ("ok", connection.serve(request))
        except Exception as exc:
            answer = ("error", type(exc).__name__, str(exc))
        try:
            answers.writelines(frame(answer))
        except BrokenPipeError:  # relay is gone (it stopped, or was killed): so is its answer
            break
        if request[0] == "close":
            break
    connection.close()


if __name__ == "__main__":
    main()
