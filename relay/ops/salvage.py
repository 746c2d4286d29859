"""`relay salvage`: copies what can still be read from a damaged database into a new one."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from relay.outbox.store import SCHEMA as OUTBOX_SCHEMA
from relay.state.sqlite import SCHEMA as STATE_SCHEMA

# Messages first: they are what a 200 promised; then dead letters, counters and user state.
TABLES = ("outbox", "dead_letters", "counters", "user_groups", "internal_users", "id_links",
          "group_members", "ungrouped_tracks")


_MESSAGES = ("outbox", "dead_letters")
_BODY = 4  # the body column of both message tables (after id, upstream, write_key, user_key)


def _whole(body: Any) -> bool:
    """Whether a stored message survived intact: a page cut in half can still yield rows whose
    text runs into the zeros after the cut."""
    try:
        message = json.loads(body)
    except (TypeError, ValueError):
        return False
    return isinstance(message, dict) and isinstance(message.get("messageId"), str)


class SalvageError(Exception):
    """The damaged file cannot be opened at all, or the new one exists already."""


def salvage(damaged: str, new: str) -> dict[str, int]:
    """Rows of each table copied from `damaged` into the new database `new`; `damaged` is only
    read. A table's rows are read forwards and backwards until the damage stops each scan."""
    if os.path.exists(new):
        raise SalvageError(f"{new} exists already; name a new file")
    if not os.path.isfile(damaged):
        raise SalvageError(f"no file at {damaged}")
    try:
        source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
        # As the sqlite3 shell's .dump does: a damaged schema no longer stops every read.
        source.execute("PRAGMA writable_schema=ON")
    except sqlite3.DatabaseError as exc:
        raise SalvageError(f"cannot open {damaged}: {exc}") from None
    target = sqlite3.connect(new)
    try:
        target.executescript(OUTBOX_SCHEMA + STATE_SCHEMA)
        return {table: _copy(source, target, table) for table in TABLES}
    finally:
        target.commit()
        target.close()
        source.close()


def _copy(source: sqlite3.Connection, target: sqlite3.Connection, table: str) -> int:
    rows: dict[int, tuple[Any, ...]] = {}
    for order in ("ASC", "DESC"):
        for rowid, *values in _readable(source, f"SELECT rowid, * FROM {table} ORDER BY rowid"
                                                f" {order}"):
            if table not in _MESSAGES or _whole(values[_BODY]):
                rows.setdefault(rowid, tuple(values))
    if not rows:
        return 0
    width = len(next(iter(rows.values())))
    marks = ", ".join("?" * width)
    target.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})",
                       [rows[k] for k in sorted(rows)])
    return len(rows)


def _readable(conn: sqlite3.Connection, sql: str) -> Iterator[tuple[Any, ...]]:
    """The rows of `sql` up to the first one the damage makes unreadable."""
    try:
        cursor = conn.execute(sql)
        while True:
            row = cursor.fetchone()
            if row is None:
                return
            yield tuple(row)
    except sqlite3.DatabaseError:
        return
