"""Moves the write-ahead log into the database file on a thread of its own, off the commit path.

By default SQLite checkpoints inside the commit that fills the WAL past 1000 pages: that commit
then copies the pages and fsyncs the database file, and every request waiting on it waits
too (the p99 of bench/). The writer connection turns that off; this thread runs a PASSIVE
checkpoint every CHECKPOINT_SECONDS instead, which never blocks the writer.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("relay.outbox")

CHECKPOINT_SECONDS = 0.5


class Checkpointer:
    """A daemon thread with its own connection, checkpointing until `stop`."""

    def __init__(self, path: str, seconds: float = CHECKPOINT_SECONDS) -> None:
        self.path = path
        self.seconds = seconds
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after its current checkpoint (the last connection to close checkpoints
        what is left)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            while not self._stop.wait(self.seconds):
                self._checkpoint(conn)
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.checkpoints += 1
        except sqlite3.Error as exc:  # a full disk, say: the next round tries again
            log.warning("storage: checkpoint failed (%s); the log grows until one succeeds", exc)
