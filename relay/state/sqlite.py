"""What rules remember about users: current group, internal verdicts, anonymousId links.

The interface (`State`) and what every store shares are in `relay.state.model`. The SQLite
implementation keeps a bounded in-memory cache in front of the database: a known user
costs no database round trip, and writes ride in the outbox's next group commit, with the
messages that caused them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import aiosqlite
import orjson

from relay.outbox.writer import Statement
from relay.state.model import (
    Cache,
    Membership,
    NotLoaded,
    anon_ref,
    storable,
    user_ref,
    wins,
)

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
# What `load` reads, in one statement: groups (?1), verdicts (?2), and the links around the
# userIds of ?3 and the anonymousIds of ?4: each such user's anonymousIds, with the verdicts of
# all of them, which marking one of them internal needs (an internal verdict covers the user and
# every anonymousId linked to it, whichever was marked or linked first).
_LOAD = """
WITH users(id) AS (SELECT value FROM json_each(?3)
                   UNION SELECT user_id FROM id_links
                   WHERE anonymous_id IN (SELECT value FROM json_each(?4))),
     around(id, anonymous) AS (SELECT user_id, anonymous_id FROM id_links
                               WHERE user_id IN (SELECT id FROM users))
SELECT 'g', ref, group_id, at FROM user_groups WHERE ref IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT 'i', ref, NULL, NULL FROM internal_users
    WHERE ref IN (SELECT value FROM json_each(?2)) OR ref IN (SELECT 'u:' || id FROM users)
       OR ref IN (SELECT 'a:' || anonymous FROM around)
UNION ALL
SELECT 'l', id, anonymous, NULL FROM around
UNION ALL
SELECT 'u', id, NULL, NULL FROM users
"""
UNGROUPED = ("INSERT INTO ungrouped_tracks (ref, count) VALUES (?, ?) ON CONFLICT(ref)"
              " DO UPDATE SET count = count + excluded.count")


class SqliteState:
    """State in the relay database; `dry` keeps every change in memory only (for `relay try`)."""

    def __init__(self, path: str, cache_size: int = 100_000, dry: bool = False) -> None:
        self.path = path
        self.dry = dry
        self._conn: aiosqlite.Connection | None = None
        self._groups: Cache[Membership | None] = Cache(cache_size)
        self._internal: Cache[bool] = Cache(cache_size)
        # anonymousId -> userId, as last written ("" when linked to none)
        self._links: Cache[str] = Cache(cache_size)
        # u:<userId> -> the a:<anonymousId> refs linked to it, for marking them with it
        self._linked: Cache[set[str]] = Cache(cache_size)
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
        for cache in (self._groups, self._internal, self._links, self._linked, self._members):
            cache.clear()

    # loading, before the rules

    async def load(self, refs: Iterable[str]) -> None:
        """Brings into memory, for each of `refs` not there yet, its group and internal verdict,
        and the links around it: a userId's anonymousIds, an anonymousId's userId, with their
        verdicts (what marking one of them needs). One query, and none when all are there (most
        requests). Until `settle`, nothing is evicted, so that all of it is there for the
        rules."""
        groups, internal, linked, links = self._groups, self._internal, self._linked, self._links
        for cache in (groups, internal, linked, links):
            cache.holding = True
        no_group: list[str] = []
        no_verdict: list[str] = []
        users: list[str] = []
        anons: list[str] = []
        for ref in refs:  # one pass: this runs for every message of every request
            if ref not in groups:
                no_group.append(ref)
            if ref not in internal:
                no_verdict.append(ref)
            if ref[:2] == "u:":
                if ref not in linked:
                    users.append(ref[2:])
            elif ref[2:] not in links:
                anons.append(ref[2:])
        if not (no_group or no_verdict or users or anons):
            return
        found = await self._rows(_LOAD, [_json(no_group), _json(no_verdict), _json(users),
                                         _json(anons)])
        self._remember_loaded(found, no_group, no_verdict, anons)

    def _remember_loaded(self, found: list[Any], no_group: list[str], no_verdict: list[str],
                         anons: list[str]) -> None:
        known, marked, around = self._parsed(found)
        for ref in no_group:
            self._groups.remember(ref, known.get(ref))
        for anonymous_id in anons:
            if anonymous_id not in self._links:
                self._links.remember(anonymous_id, "")  # linked to no userId
        for ref in no_verdict:
            self._internal.remember(ref, ref in marked)
        for user, anonymous in around.items():
            if user not in self._linked:
                self._linked.remember(user, anonymous)
            for each in (user, *anonymous):
                if each not in self._internal:
                    self._internal.remember(each, each in marked)

    def _parsed(self, found: list[Any]) -> tuple[dict[str, Membership], set[str],
                                                  dict[str, set[str]]]:
        """`_LOAD`'s rows as groups, internal refs and each user's anonymous refs; the links
        go into the cache as they come."""
        known: dict[str, Membership] = {}
        marked: set[str] = set()
        around: dict[str, set[str]] = {}
        for kind, ref, value, at in found:
            if kind == "g":
                known[ref] = Membership(value, at)
            elif kind == "i":
                marked.add(ref)
            elif kind == "u":
                around.setdefault(f"u:{ref}", set())
            else:
                around.setdefault(f"u:{ref}", set()).add(anon_ref(value))
                self._links.remember(value, ref)
        return known, marked, around

    def settle(self) -> None:
        """The rules of a request are done: the caches may evict again."""
        for cache in (self._groups, self._internal, self._linked, self._links):
            cache.trim()

    async def _rows(self, sql: str, args: list[str]) -> list[Any]:
        if self._conn is None:
            return []
        # One call on the connection's thread: between a cursor's execute and its fetch, another
        # request's read would run inside this statement's read transaction and see old state.
        return list(await self._conn.execute_fetchall(sql, args))

    # reads and writes, in memory

    def group(self, ref: str) -> Membership | None:
        # `Cache.recall` written out: every ungrouped track reads here, and a call is a frame.
        groups = self._groups
        try:
            groups.move_to_end(ref)
        except KeyError:
            raise NotLoaded(ref) from None
        return groups[ref]

    def set_group(self, ref: str, group_id: str, at: str) -> bool:
        """Makes `group_id` current unless a later event already chose another; True if set."""
        current = self.group(ref)
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

    def is_internal(self, ref: str) -> bool:
        internal = self._internal
        try:  # as in `group`
            internal.move_to_end(ref)
        except KeyError:
            raise NotLoaded(ref) from None
        return internal[ref]

    def mark_internal(self, refs: Iterable[str], reason: str) -> None:
        """Marks `refs` internal, and with each its user and every anonymousId linked to it:
        one verdict for all of a user's ids, whichever was seen first."""
        for ref in list(refs):
            if self.is_internal(ref):
                continue
            self._mark(ref, reason)
            user = ref if ref[:2] == "u:" else self._user_of(ref)
            if user is None:
                continue
            if not self.is_internal(user):
                self._mark(user, "linked")
            for linked in sorted(self._linked.get(user, ())):
                if not self.is_internal(linked):
                    self._mark(linked, reason)

    def _user_of(self, anonymous: str) -> str | None:
        user_id = self._links.get(anonymous[2:])
        return f"u:{user_id}" if user_id else None

    def _mark(self, ref: str, reason: str) -> None:
        self._internal.remember(ref, True)
        now = time.time()
        self._pending.append((_INTERNAL, [(ref, reason, now)]))
        self._record(["i", ref, reason, now])

    def link(self, anonymous_id: str, user_id: str) -> None:
        """Ties an anonymousId to a userId; an internal verdict on either covers both."""
        anonymous, user = anon_ref(anonymous_id), user_ref(user_id)
        before = self._links.get(anonymous[2:])
        if before and f"u:{before}" != user:  # moved to another user: no longer one of theirs
            self._linked.get(f"u:{before}", set()).discard(anonymous)
        self._tie(anonymous_id, user_id)
        linked = self._linked.get(user)
        if linked is not None:
            linked.add(anonymous)
        if self.is_internal(anonymous) or self.is_internal(user):
            self.mark_internal([anonymous, user], "linked")

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

    async def _has_tables(self) -> bool:
        assert self._conn is not None
        sql = "SELECT count(*) FROM sqlite_master WHERE name = 'user_groups'"
        async with self._conn.execute(sql) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])


def _json(keys: list[str]) -> str:
    return orjson.dumps(keys).decode()
