"""With `workers: N`, each worker process keeps its own SQLite file (its outbox, dead letters,
counters, state journal): `storage.path` for worker 1, `<name>.w<K><suffix>` beside it for
worker K (`Config.database`). Operators' commands read them all.

When relay starts with fewer workers than last time, the files of the workers that are gone
still hold messages: they are moved into worker 1's file before anything serves, then removed.
A crash in the middle of that may move some twice (delivered twice; vendors deduplicate on
messageId); none is lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sqlite3
from pathlib import Path

from relay.config.model import Config
from relay.outbox.store import SCHEMA
from relay.state.shared import JOURNAL

log = logging.getLogger("relay")

# What a worker's file holds that must outlive it, and how its rows are moved: the columns
# but the id (worker 1's file numbers them after its own, keeping their order).
_MOVED = {
    "outbox": "upstream, write_key, user_key, body, enqueued_at",
    "dead_letters": "upstream, write_key, user_key, body, enqueued_at, failed_at, status, answer",
    "state_journal": "ops",
    "held": "write_key, route, refs, body",
}


def paths(config: Config) -> list[tuple[int, str]]:
    """(worker, file) of every worker of `config`, and of earlier workers whose files remain."""
    found = {worker: dataclasses.replace(config, worker=worker).database
             for worker in range(1, config.workers + 1)}
    found.update(_leftovers(config.storage.path))
    return sorted(found.items())


def _leftovers(storage_path: str) -> dict[int, str]:
    base = Path(storage_path)
    pattern = re.compile(re.escape(base.stem) + r"\.w([0-9]+)" + re.escape(base.suffix) + "$")
    out: dict[int, str] = {}
    if base.parent.is_dir():
        for child in base.parent.iterdir():
            match = pattern.match(child.name)
            if match and int(match.group(1)) >= 2:
                out[int(match.group(1))] = str(child)
    return out


def merge_leftovers(config: Config) -> int:
    """Moves what the files of workers beyond `config.workers` hold into worker 1's file and
    removes them; how many messages were moved."""
    moved = 0
    for worker, path in sorted(_leftovers(config.storage.path).items()):
        if worker <= config.workers:
            continue
        moved += _merge(config.storage.path, path)
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)
        log.warning("storage: worker %d is gone (workers: %d); its file %s was moved into %s",
                    worker, config.workers, path, config.storage.path)
    return moved


def _merge(into: str, path: str) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(into)), exist_ok=True)
    conn = sqlite3.connect(into, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        _schema(conn)
        conn.execute("ATTACH DATABASE ? AS gone", (path,))
        theirs = {row[0] for row in conn.execute("SELECT name FROM gone.sqlite_master")}
        conn.execute("BEGIN IMMEDIATE")
        moved = 0
        for table, columns in _MOVED.items():
            if table in theirs:
                moved += conn.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns}"
                                      f" FROM gone.{table} ORDER BY id").rowcount
        if "counters" in theirs:
            conn.execute("INSERT INTO main.counters (name, count) SELECT name, count FROM"
                         " gone.counters WHERE true ON CONFLICT(name) DO UPDATE SET"
                         " count = count + excluded.count")
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE gone")
        return moved
    finally:
        conn.close()


def _schema(conn: sqlite3.Connection) -> None:
    """Worker 1's tables, should its file be new."""
    conn.executescript(SCHEMA + JOURNAL)
