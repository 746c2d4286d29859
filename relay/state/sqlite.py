"""What rules remember about users: current group, internal verdicts, anonymousId links.

A small interface (`State`), so that several relays can later share it in another store. The
SQLite implementation keeps a bounded in-memory cache in front of the database: a known user
costs no database round trip, and writes ride in the outbox's next group commit, with the
messages that caused them.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import aiosqlite

from relay import clock
from relay.outbox.writer import Statement

SCHEMA = """
CREATE TABLE IF NOT EXISTS user_groups (ref TEXT PRIMARY KEY, group_id TEXT NOT NULL,
    at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS internal_users (ref TEXT PRIMARY KEY, reason TEXT NOT NULL,
    first_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS id_links (anonymous_id TEXT PRIMARY KEY, user_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS id_links_by_user ON id_links (user_id);
CREATE TABLE IF NOT EXISTS group_members (ref TEXT NOT NULL, group_id TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, PRIMARY KEY (ref, group_id));
CREATE TABLE IF NOT EXISTS ungrouped_tracks (ref TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""

_SET_GROUP = ("INSERT INTO user_groups (ref, group_id, at) VALUES (?, ?, ?) ON CONFLICT(ref)"
              " DO UPDATE SET group_id = excluded.group_id, at = excluded.at")
_INTERNAL = "INSERT OR IGNORE INTO internal_users (ref, reason, first_seen) VALUES (?, ?, ?)"
_LINK = "INSERT OR REPLACE INTO id_links (anonymous_id, user_id) VALUES (?, ?)"
_MEMBER = ("INSERT INTO group_members (ref, group_id, first_seen, last_seen) VALUES (?, ?, ?, ?)"
           " ON CONFLICT(ref, group_id) DO UPDATE SET last_seen = excluded.last_seen")
UNGROUPED = ("INSERT INTO ungrouped_tracks (ref, count) VALUES (?, ?) ON CONFLICT(ref)"
              " DO UPDATE SET count = count + excluded.count")


def storable(text: str) -> str:
    """`text` as SQLite and Redis can keep it: JSON allows lone surrogates (`\\ud800`) in ids,
    UTF-8 does not, so each such one is kept as its bytes' escape (`\\xed\\xa0\\x80`). Clean
    text is unchanged, so this may be applied twice."""
    if text.isascii():  # nearly every id: one constant-time test
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")


def user_ref(user_id: str) -> str:
    return f"u:{storable(user_id)}"


def anon_ref(anonymous_id: str) -> str:
    return f"a:{storable(anonymous_id)}"


class Missing(Enum):
    """What a `*_now` read gives when the answer is not in memory: the caller must await it."""

    MISSING = "missing"


MISSING = Missing.MISSING


@dataclass(frozen=True)
class Membership:
    """A user's current group, and the event time that made it current."""

    group_id: str
    at: str


class State(Protocol):
    """The state rules may read and change; refs are `u:<userId>` or `a:<anonymousId>`.

    Each `*_now` method is its awaited namesake answered from memory, without a coroutine (most
    messages are about users already in memory); it gives MISSING, or False for `link_now`,
    having changed nothing, when the awaited one is needed.
    """

    async def group(self, ref: str) -> Membership | None: ...

    def group_now(self, ref: str) -> Membership | Missing | None: ...

    async def set_group(self, ref: str, group_id: str, at: str) -> bool: ...

    def set_group_now(self, ref: str, group_id: str, at: str) -> bool | Missing: ...

    async def is_internal(self, ref: str) -> bool: ...

    def any_internal_now(self, refs: Sequence[str]) -> bool | Missing: ...

    async def mark_internal(self, refs: Iterable[str], reason: str) -> None: ...

    async def link(self, anonymous_id: str, user_id: str) -> None: ...

    def link_now(self, anonymous_id: str, user_id: str) -> bool: ...

    def note_member(self, ref: str, group_id: str) -> None: ...

    def note_ungrouped_track(self, ref: str) -> None: ...


V = TypeVar("V")


class Cache(OrderedDict[str, V], Generic[V]):
    """A least-recently-used mapping of at most `size` entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: str, value: V) -> V:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)
        return value

    def recall(self, key: str) -> V | Missing:
        """The value under `key`, now the most recently used, or MISSING."""
        try:
            self.move_to_end(key)  # a KeyError here is the one lookup a miss costs
        except KeyError:
            return MISSING
        return self[key]


class SqliteState:
    """State in the relay database; `dry` keeps every change in memory only (for `relay try`)."""

    def __init__(self, path: str, cache_size: int = 100_000, dry: bool = False) -> None:
        self.path = path
        self.dry = dry
        self._conn: aiosqlite.Connection | None = None
        self._groups: Cache[Membership | None] = Cache(cache_size)
        self._internal: Cache[bool] = Cache(cache_size)
        self._links: Cache[str] = Cache(cache_size)
        self._members: Cache[float] = Cache(cache_size)
        self._pending: list[Statement] = []
        # A plain dict: a Counter miss runs `__missing__` in Python, once per new user per request.
        self._ungrouped: dict[str, int] = {}

    async def open(self) -> None:
        """Connects (read-only when dry; a dry state over no file starts empty)."""
        if self.dry:
            if os.path.exists(self.path):  # noqa: ASYNC240 (once, before any request)
                uri = f"file:{self.path}?mode=ro"
                self._conn = await aiosqlite.connect(uri, uri=True)
                if not await self._has_tables():
                    await self.close()
            return
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        await self._conn.execute("PRAGMA busy_timeout=5000")
        await self._conn.executescript(SCHEMA)

    @property
    def connection(self) -> aiosqlite.Connection:
        """The reading connection (open)."""
        assert self._conn is not None
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def drain(self) -> list[Statement]:
        """The writes made since the last drain, for the outbox to commit with the messages."""
        if self._ungrouped:
            self._pending.append((UNGROUPED, list(self._ungrouped.items())))
            self._ungrouped.clear()
        pending, self._pending = self._pending, []
        return [] if self.dry else pending

    def committed(self) -> None:
        """What `drain` gave is committed (a shared store's shipper may send it now)."""

    def forget(self) -> None:
        """Drops the cache, after a commit failed, so what it says matches the database."""
        for cache in (self._groups, self._internal, self._links, self._members):
            cache.clear()

    async def group(self, ref: str) -> Membership | None:
        found = self.group_now(ref)
        if found is not MISSING:
            return found
        row = await self._one("SELECT group_id, at FROM user_groups WHERE ref = ?", ref)
        membership = Membership(row[0], row[1]) if row else None
        self._groups.remember(ref, membership)
        return membership

    def group_now(self, ref: str) -> Membership | Missing | None:
        # `Cache.recall` written out: every ungrouped track reads here, and a call is a frame.
        groups = self._groups
        try:
            groups.move_to_end(ref)
        except KeyError:
            return MISSING
        return groups[ref]

    async def set_group(self, ref: str, group_id: str, at: str) -> bool:
        """Makes `group_id` current unless a later event already chose another; True if set."""
        return self._set_group(ref, await self.group(ref), group_id, at)

    def set_group_now(self, ref: str, group_id: str, at: str) -> bool | Missing:
        current = self.group_now(ref)
        if current is MISSING:
            return MISSING
        return self._set_group(ref, current, group_id, at)

    def _set_group(self, ref: str, current: Membership | None, group_id: str, at: str) -> bool:
        group_id = storable(group_id)
        if current is not None and not wins(group_id, at, current):
            return False
        if current != Membership(group_id, at):
            self._groups.remember(ref, Membership(group_id, at))
            self._pending.append((_SET_GROUP, [(ref, group_id, at)]))
            self._record(["g", ref, group_id, at])
        return True

    def _record(self, op: list[Any]) -> None:
        """A change as a shared store takes it (`relay.state.shared`); nothing here."""

    async def is_internal(self, ref: str) -> bool:
        found = self._internal.recall(ref)
        if found is not MISSING:
            return found
        row = await self._one("SELECT 1 FROM internal_users WHERE ref = ?", ref)
        return bool(self._internal.remember(ref, row is not None))

    def any_internal_now(self, refs: Sequence[str]) -> bool | Missing:
        """Whether one of `refs` is internal, read in order up to the first that is, as awaiting
        `is_internal` on each would."""
        internal = self._internal
        for ref in refs:
            try:  # `Cache.recall` written out, as in `group_now`
                internal.move_to_end(ref)
            except KeyError:
                return MISSING
            if internal[ref]:
                return True
        return False

    async def mark_internal(self, refs: Iterable[str], reason: str) -> None:
        """Marks `refs`, and every anonymousId linked to a marked userId, internal."""
        for ref in list(refs):
            if await self.is_internal(ref):
                continue
            self._mark(ref, reason)
            for linked in await self._linked_anonymous(ref):
                if not await self.is_internal(linked):
                    self._mark(linked, reason)

    def _mark(self, ref: str, reason: str) -> None:
        self._internal.remember(ref, True)
        now = time.time()
        self._pending.append((_INTERNAL, [(ref, reason, now)]))
        self._record(["i", ref, reason, now])

    async def link(self, anonymous_id: str, user_id: str) -> None:
        """Ties an anonymousId to a userId; an internal verdict on either covers both."""
        self._tie(anonymous_id, user_id)
        refs = [anon_ref(anonymous_id), user_ref(user_id)]
        for ref in refs:
            if await self.is_internal(ref):
                await self.mark_internal(refs, "linked")
                return

    def link_now(self, anonymous_id: str, user_id: str) -> bool:
        """`link` when neither id is internal, as known in memory; False (nothing changed) else.
        Reading before tying is safe: the tie touches no verdict."""
        if self.any_internal_now([anon_ref(anonymous_id), user_ref(user_id)]) is not False:
            return False
        self._tie(anonymous_id, user_id)
        return True

    def _tie(self, anonymous_id: str, user_id: str) -> None:
        anonymous_id, user_id = storable(anonymous_id), storable(user_id)
        if self._links.get(anonymous_id) != user_id:
            self._links.remember(anonymous_id, user_id)
            self._pending.append((_LINK, [(anonymous_id, user_id)]))
            self._record(["l", anonymous_id, user_id])

    def note_member(self, ref: str, group_id: str) -> None:
        """Records that `ref` was seen in `group_id` (for `relay report`)."""
        group_id = storable(group_id)
        key = f"{ref}\n{group_id}"
        now = time.time()
        if key not in self._members or now - self._members[key] > 60:
            self._members.remember(key, now)
            self._pending.append((_MEMBER, [(ref, group_id, now, now)]))
            self._record(["m", ref, group_id, now])

    def note_ungrouped_track(self, ref: str) -> None:
        """Counts a track call that came without a group (for `relay report`)."""
        ungrouped = self._ungrouped
        ungrouped[ref] = ungrouped.get(ref, 0) + 1

    async def _linked_anonymous(self, ref: str) -> list[str]:
        if not ref.startswith("u:"):
            return []
        user_id = ref[2:]
        # Links made since the last commit are still in `_pending`, not yet in the database.
        found = {anon_ref(row[0]) for sql, rows in self._pending if sql == _LINK
                 for row in rows if row[1] == user_id}
        if self._conn is not None:
            sql = "SELECT anonymous_id FROM id_links WHERE user_id = ?"
            found.update(anon_ref(row[0]) for row in await self._conn.execute_fetchall(
                sql, (user_id,)))
        return sorted(found)

    async def _one(self, sql: str, ref: str) -> Any:
        if self._conn is None:
            return None
        # One call on the connection's thread: between a cursor's execute and its fetch, another
        # request's read would run inside this statement's read transaction and see old state.
        rows = list(await self._conn.execute_fetchall(sql, (ref,)))
        return rows[0] if rows else None

    async def _has_tables(self) -> bool:
        assert self._conn is not None
        sql = "SELECT count(*) FROM sqlite_master WHERE name = 'user_groups'"
        async with self._conn.execute(sql) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])


def wins(group_id: str, at: str, current: Membership) -> bool:
    """Whether a group call of `group_id` at event time `at` makes it the current group over
    `current`: the later event time wins, and the same time goes to the greater group id, so
    that the order the calls arrive in never matters (a shared store decides the same way).
    Event times are `identity.event_time`'s, `YYYY-MM-DDTHH:MM:SS.mmmZ`, whose text sorts as
    the time does; a time in another shape is compared as a time (and never wins unread)."""
    if len(at) == len(current.at) == _EVENT_TIME and at[-1] == current.at[-1] == "Z":
        return (at, group_id) > (current.at, current.group_id)
    a, b = clock.parse(at), clock.parse(current.at)
    if a is None or b is None:
        return b is None
    return (a, group_id) > (b, current.group_id)


_EVENT_TIME = len("2026-01-01T00:00:00.000Z")
