"""Any split of one user's calls over two relays sharing Redis ends in the state one relay reaches
with the same calls: the current group (the latest event time, ties to the greater group id), who
is internal (a verdict only ever set, and carried over links), the groups seen, the tracks
without a group. Hypothesis draws the calls (identify with and without a staff email, group calls
at drawn times, tracks with and without a group, from the userId and from two anonymousIds) and
which relay takes each; one relay with its own SQLite state takes them all, in the same order.

The relays ship their writes to Redis on their own, so the order in which Redis applies them is
not the order of the calls: that is the interleaving this holds the result to. (An alias is left
out: whether it carries the previous id's group depends on what the relay taking it knows then.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redisproc import RedisServer, needs_redis

from relay import app, server
from relay.config import model as config

pytestmark = needs_redis

STAFF = "staff.io"
RULES = [{"type": "one_group_per_user"},
         {"type": "drop_internal_users", "email_domains": [STAFF], "own_groups": ["ours"]}]
_users = itertools.count()


class Relays:
    """Relays A and B on one Redis, and S alone on SQLite, served on a loop in a thread."""

    def __init__(self, folder: Path) -> None:
        self.redis = RedisServer(folder / "redis").start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        vendor = f"http://127.0.0.1:{free_port()}"  # nobody: the state is what is looked at
        self.listeners = {name: self._start(folder, name, vendor, shared)
                          for name, shared in (("A", True), ("B", True), ("S", False))}

    def _start(self, folder: Path, name: str, vendor: str, shared: bool) -> server.Listener:
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "storage": {"path": str(folder / f"{name}.db"), "synchronous": "normal"},
            "state": {"backend": "redis", "url": self.redis.url} if shared else {},
            "upstreams": [{"name": "seg", "kind": "segment", "url": vendor}], "rules": RULES}))
        cfg = config.load(str(path))
        listener = server.Listener(app.build(cfg), cfg)
        asyncio.run_coroutine_threadsafe(listener.start(port=0), self.loop).result(30)
        return listener

    def post(self, name: str, path: str, body: dict[str, Any]) -> None:
        port = self.listeners[name].port
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200

    def shipped(self) -> None:
        """Waits until A's and B's journals have reached Redis."""
        deadline = time.monotonic() + 10
        for name in ("A", "B"):
            db = self.listeners[name].config.storage.path
            while True:
                with sqlite3.connect(db) as conn:
                    if not conn.execute("SELECT count(*) FROM state_journal").fetchone()[0]:
                        break
                assert time.monotonic() < deadline, "a journal never emptied"
                time.sleep(0.01)

    def stop(self) -> None:
        for listener in self.listeners.values():
            asyncio.run_coroutine_threadsafe(listener.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.redis.stop()


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relays]:
    both = Relays(tmp_path_factory.mktemp("interleaving"))
    yield both
    both.stop()


def single(db: str, user: str) -> dict[str, Any]:
    """One relay's state of `user` (and their anonymousIds), from its SQLite file."""
    refs = [f"u:{user}", f"a:{user}-1", f"a:{user}-2"]
    marks = ",".join("?" * len(refs))
    with sqlite3.connect(db) as conn:
        groups = {ref: [g, at] for ref, g, at in conn.execute(
            f"SELECT ref, group_id, at FROM user_groups WHERE ref IN ({marks})", refs)}
        internal = {ref for (ref,) in conn.execute(
            f"SELECT ref FROM internal_users WHERE ref IN ({marks})", refs)}
        members = {(ref, g) for ref, g in conn.execute(
            f"SELECT ref, group_id FROM group_members WHERE ref IN ({marks})", refs)}
        tracks = dict(conn.execute(
            f"SELECT ref, count FROM ungrouped_tracks WHERE ref IN ({marks})", refs))
    return {"groups": groups, "internal": internal, "members": members, "tracks": tracks}


def shared(client: Any, user: str) -> dict[str, Any]:
    """The same, from Redis."""
    refs = [f"u:{user}", f"a:{user}-1", f"a:{user}-2"]
    out: dict[str, Any] = {"groups": {}, "internal": set(), "members": set(), "tracks": {}}
    for ref in refs:
        held = client.hgetall(f"relay:{ref}")
        if "g" in held:
            out["groups"][ref] = [held["g"], held["gt"]]
        if "i" in held:
            out["internal"].add(ref)
        if int(held.get("t", 0)):
            out["tracks"][ref] = int(held["t"])
        out["members"] |= {(ref, g) for g in client.hkeys(f"relay:m:{ref}")}
    return out


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, list[tuple[str, str, dict[str, Any]]]]:
    """One user's calls, each with the relay (A or B) that takes it."""
    user = f"user{next(_users)}"
    out = []
    for n in range(draw(st.integers(1, 12))):
        who = draw(st.sampled_from([{"userId": user}, {"anonymousId": f"{user}-1"},
                                    {"anonymousId": f"{user}-2"},
                                    {"userId": user, "anonymousId": f"{user}-1"},
                                    {"userId": user, "anonymousId": f"{user}-2"}]))
        kind = draw(st.sampled_from(["identify", "staff", "group", "track", "grouped"]))
        at = f"2026-12-07T10:00:{draw(st.integers(0, 5)):02d}.000Z"
        body: dict[str, Any] = {**who, "messageId": f"{user}-{n}", "timestamp": at}
        if kind in ("identify", "staff"):
            path = "/v1/identify"
            email = f"x@{STAFF}" if kind == "staff" else "x@customer.example"
            body["traits"] = {"email": email}
        elif kind == "group":
            path = "/v1/group"
            body["groupId"] = draw(st.sampled_from(["g1", "g2", "ours"]))
        else:
            path = "/v1/track"
            body["event"] = "E"
            if kind == "grouped":
                body["context"] = {"groupId": draw(st.sampled_from(["g1", "g3"]))}
        out.append((draw(st.sampled_from("AB")), path, body))
    return user, out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=calls())
def test_two_relays_end_where_one_relay_ends(relays, drawn):
    """Whatever relay takes each of a user's calls, Redis ends with the state one relay keeps
    after the same calls in the same order."""
    user, sequence = drawn
    for relay, path, body in sequence:
        relays.post(relay, path, body)
        relays.post("S", path, body)
    relays.shipped()
    alone = single(relays.listeners["S"].config.storage.path, user)
    assert shared(relays.redis.client(), user) == alone
