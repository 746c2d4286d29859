"""Several relays, one memory: two relays (in-process, each with its own outbox) on one real
redis-server, with the B2B rules, give the answers one relay would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import RunningRelay
from fakes import FakeUpstream
from redisproc import RedisServer, needs_redis

from relay import config, report

pytestmark = needs_redis

STAFF = "staff.io"
RULES: list[dict[str, Any]] = [
    {"type": "one_group_per_user"},
    {"type": "drop_internal_users", "email_domains": [STAFF], "own_groups": ["ours"]},
]


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


Start = Callable[..., RunningRelay]


@pytest.fixture
def relays(tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> Start:
    """Builds relay number n (its own file and outbox) on the test's Redis; use it as
    `async with relays(n) as relay`."""

    def make(n: int, **state: Any) -> RunningRelay:
        path = tmp_path / f"relay-{n}.yaml"
        path.write_text(yaml.safe_dump({
            "listen": "127.0.0.1:8080",
            "storage": {"path": str(tmp_path / f"relay-{n}.db"), "synchronous": "normal"},
            "state": {"backend": "redis", "url": redis_server.url, **state},
            "upstreams": [{"name": "seg", "kind": "segment", "url": upstream.url,
                           "backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2}],
            "rules": RULES}))
        return RunningRelay(config.load(str(path)))

    return make


async def post(http: aiohttp.ClientSession, relay: RunningRelay, path: str,
               body: dict[str, Any]) -> int:
    async with http.post(relay.url + path, json=body) as resp:
        await resp.read()
        return resp.status


async def shipped(*relays: RunningRelay, seconds: float = 5.0) -> None:
    """Waits until every relay's journal has reached Redis."""
    for _ in range(int(seconds / 0.02)):
        pending = 0
        for relay in relays:
            rows = await relay.relay.state.connection.execute_fetchall(
                "SELECT count(*) FROM state_journal")
            pending += list(rows)[0][0]
        if not pending:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the state journal never emptied")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_staff_identified_on_one_relay_are_dropped_on_the_other(relays, upstream, http):
    """A staff member identified with their email on relay A: their 100 email-less tracks on
    relay B are none of them forwarded (B had never seen them)."""
    async with relays(1) as a, relays(2) as b:
        assert await post(http, a, "/v1/identify", {"userId": "s1", "messageId": "id-1",
                                                    "traits": {"email": f"x@{STAFF}"}}) == 200
        await shipped(a)
        for n in range(100):
            assert await post(http, b, "/v1/track", {"userId": "s1", "event": "Viewed",
                                                     "messageId": f"t-{n}"}) == 200
        assert await post(http, b, "/v1/track", {"userId": "c1", "event": "Viewed",
                                                 "messageId": "marker"}) == 200
        got = await upstream.wait_for(1)
    assert [m["messageId"] for m in got] == ["marker"]


async def test_the_later_group_call_wins_on_every_relay(relays, upstream, http):
    """`group g2` at t=10 on relay A and `group g1` at t=5 on relay B (after it): tracks on
    either relay get g2, and Redis holds g2."""
    async with relays(1) as a, relays(2) as b:
        assert await post(http, a, "/v1/group", {
            "userId": "u1", "groupId": "g2", "timestamp": "2026-12-07T10:00:10.000Z"}) == 200
        await shipped(a)
        assert await post(http, b, "/v1/group", {
            "userId": "u1", "groupId": "g1", "timestamp": "2026-12-07T10:00:05.000Z"}) == 200
        await shipped(b)
        for n, relay in enumerate((a, b)):
            assert await post(http, relay, "/v1/track", {
                "userId": "u1", "event": "E", "messageId": f"t{n}"}) == 200
        got = await upstream.wait_for(4)
        tracks = {m["messageId"]: m["context"]["groupId"] for m in got if m["type"] == "track"}
        assert tracks == {"t0": "g2", "t1": "g2"}
        client = a.relay.store
        assert client is not None
        held = await client.client.hmget("relay:u:u1", ["g", "gt"])
        assert held == ["g2", "2026-12-07T10:00:10.000Z"]


async def test_the_report_covers_every_relays_traffic(relays, http):
    """A user in group g1 on relay A and g2 on relay B, and a staff member seen on B only: the
    report built from either relay's config lists both."""
    async with relays(1) as a, relays(2) as b:
        await post(http, a, "/v1/group", {"userId": "m1", "groupId": "g1"})
        await post(http, b, "/v1/group", {"userId": "m1", "groupId": "g2"})
        await post(http, b, "/v1/identify", {"userId": "s9", "traits": {"email": f"s@{STAFF}"}})
        await shipped(a, b)
        built = await report.build(a.config)
    assert [(u["user"], u["groups"]) for u in built["multi_group_users"]] == \
        [("u:m1", ["g1", "g2"])]
    assert [u["user"] for u in built["internal_users"]] == ["u:s9"]
    assert json.dumps(built)  # as /admin/report serves it
