"""The one SQLite connection that writes, on a thread of its own.

A whole transaction is one hop to that thread: BEGIN, every statement, COMMIT. With a hop per
statement (as through aiosqlite) a busy event loop made each commit wait one loop turn per
statement, and every request waited for those turns.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Statement = tuple[str, list[tuple[Any, ...]]]


class Writer:
    """Runs transactions on a dedicated thread that owns the connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-writer")

    async def open(self, pragmas: list[str], schema: str) -> list[str]:
        """Connects, applies `pragmas` and `schema`; returns what `PRAGMA quick_check` says."""
        verdict: list[str] = await self._call(self._open, pragmas, schema)
        return verdict

    async def transaction(self, statements: list[Statement]) -> None:
        """Every statement in one transaction: committed together, or not at all."""
        await self._call(self._transaction, statements)

    async def close(self) -> None:
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open(self, pragmas: list[str], schema: str) -> list[str]:
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            self._conn.execute(pragma)
        self._conn.executescript(schema)
        return [str(row[0]) for row in self._conn.execute("PRAGMA quick_check")]

    def _transaction(self, statements: list[Statement]) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
