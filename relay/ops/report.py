"""`relay report`: what the rules saw: users in several groups, internal users, rule counts.

With `state.backend: redis` the users come from Redis, so the report covers every relay sharing
it; the rule counts are this relay's (its database's, with workers all of theirs)."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import aiosqlite

from relay import clock
from relay.config.model import Config
from relay.metrics import Metrics
from relay.ops import worker_files
from relay.state.redis_store import RedisStore


async def build(config: Config, store: RedisStore | None = None) -> dict[str, Any]:
    """The report for `config`: from its database (read-only; empty when there is none yet),
    and, with the redis backend, the users from Redis (through `store`, or a client of its own).
    """
    built = await _gathered(config, store)
    for user in built["internal_users"]:  # JSON readers get times as text, like every other
        user["first_seen"] = clock.iso(clock.datetime_of(float(user["first_seen"])))
    return built


async def _gathered(config: Config, store: RedisStore | None) -> dict[str, Any]:
    built = await _from_sqlite(config.storage.path)
    for worker, path in worker_files.paths(config):  # with workers: every worker's counts
        if worker > 1 and os.path.exists(path):  # noqa: ASYNC240 (one look per worker)
            for name, n in (await _from_sqlite(path))["counters"].items():
                built["counters"][name] = built["counters"].get(name, 0) + n
    if config.state.backend != "redis":
        return built
    own = store is None
    client = RedisStore(config.state, Metrics()) if store is None else store
    try:
        multi, internal = await client.report()
    finally:
        if own:
            await client.close()
    built["multi_group_users"] = [{"user": ref, "groups": groups, "tracks_without_group": n}
                                  for ref, n, groups in multi]
    built["internal_users"] = [{"user": ref, "reason": reason, "first_seen": first}
                               for ref, reason, first in internal]
    return built


async def _from_sqlite(path: str) -> dict[str, Any]:
    empty: dict[str, Any] = {"counters": {}, "multi_group_users": [], "internal_users": []}
    if not os.path.exists(path):  # noqa: ASYNC240 (a CLI command, nothing else runs)
        return empty
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as conn:
        try:
            return {
                "counters": dict(await conn.execute_fetchall(  # type: ignore[arg-type]
                    "SELECT name, count FROM counters ORDER BY name")),
                "multi_group_users": [
                    {"user": ref, "groups": groups.split("\n"), "tracks_without_group": n}
                    for ref, groups, n in await conn.execute_fetchall(
                        "SELECT m.ref, group_concat(m.group_id, char(10)), coalesce(u.count, 0)"
                        " FROM group_members m LEFT JOIN ungrouped_tracks u ON u.ref = m.ref"
                        # Internal users are listed apart: their traffic never reaches the vendor.
                        " WHERE m.ref NOT IN (SELECT ref FROM internal_users)"
                        " GROUP BY m.ref HAVING count(*) > 1 ORDER BY m.ref")
                ],
                "internal_users": [
                    {"user": ref, "reason": reason, "first_seen": first}
                    for ref, reason, first in await conn.execute_fetchall(
                        "SELECT ref, reason, first_seen FROM internal_users ORDER BY ref")
                ],
            }
        except sqlite3.OperationalError:  # a database from before these tables existed
            return empty


def text(report: dict[str, Any]) -> list[str]:
    """The report for people."""
    lines = ["Rules (messages changed / dropped):"]
    counters: dict[str, int] = report["counters"]
    rules = sorted({k.split(".", 1)[1] for k in counters if k.startswith(("changed.", "dropped."))})
    for rule in rules:
        lines.append(f"  {rule}: {counters.get('changed.' + rule, 0)} changed,"
                     f" {counters.get('dropped.' + rule, 0)} dropped")
    invalid = {k[8:]: n for k, n in counters.items() if k.startswith("invalid.")}
    if invalid:
        lines.append("Not forwarded because the vendor would drop them:")
        lines += [f"  {reason}: {n}" for reason, n in sorted(invalid.items())]
    users = report["multi_group_users"]
    lines.append(f"Users seen in more than one group: {len(users)}")
    lines += [f"  {_who(u['user'])}: {', '.join(_printable(g) for g in u['groups'])}"
              f" ({u['tracks_without_group']} track calls came without a group)" for u in users]
    internal = report["internal_users"]
    lines.append(f"Internal users seen: {len(internal)} (delete them at the vendor)")
    lines += [f"  {_who(u['user'])} ({u['reason']})" for u in internal]
    return lines


def _who(ref: str) -> str:
    kind, _, value = ref.partition(":")
    return f"{'userId' if kind == 'u' else 'anonymousId'} {_printable(value)}"


def _printable(text: str) -> str:
    """Ids as the SDKs sent them, minus control characters a terminal would obey."""
    return "".join(c if c.isprintable() else "?" for c in text)
