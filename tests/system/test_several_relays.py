"""Several `relay serve` processes on one real redis-server: the seed scenarios split between two
relays, redis-server killed by its pid under load and started again (empty), and a relay of two
workers through the same and through kill -9. Every message answered 200 reaches the vendor."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream, free_port
from processes import Load, RelayProcess, acks_grow, wait_delivered
from redisproc import RedisServer, needs_redis

pytestmark = needs_redis

STAFF = "staff.io"
RULES = [{"type": "one_group_per_user"},
         {"type": "drop_internal_users", "email_domains": [STAFF], "own_groups": ["ours"]}]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def spawn(write_config: Callable[..., Path], upstream: FakeUpstream, redis_server: RedisServer,
          tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Starts relay n as a process on the test's Redis (each its own config and files)."""
    made: list[RelayProcess] = []

    def start(n: int, **overrides: Any) -> RelayProcess:
        folder = tmp_path / f"relay-{n}"
        folder.mkdir(exist_ok=True)
        port = free_port()
        path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                            listen=f"127.0.0.1:{port}",
                            storage={"path": str(folder / "relay.db"), "synchronous": "normal"},
                            state={"backend": "redis", "url": redis_server.url},
                            rules=RULES, **overrides)
        config = folder / "relay.yaml"
        config.write_text(path.read_text())
        relay = RelayProcess(config, port, folder / "relay.log")
        made.append(relay)
        relay.spawn()
        return relay

    yield start
    for relay in made:
        relay.ensure_dead()


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def post(http: aiohttp.ClientSession, relay: RelayProcess, path: str,
               body: dict[str, Any]) -> int:
    async with http.post(relay.url + path, json=body) as resp:
        await resp.read()
        return resp.status


async def test_the_seed_scenarios_split_between_two_relay_processes(spawn, upstream,
                                                                    redis_server):
    """Staff identified on relay A: their 100 email-less tracks on relay B are none of them
    forwarded. `group g2` at t=10 on A, `group g1` at t=5 on B: tracks on both carry g2."""
    a, b = spawn(1), spawn(2)
    await a.wait_ready()
    await b.wait_ready()
    client = redis_server.client()
    async with aiohttp.ClientSession() as http:
        assert await post(http, a, "/v1/identify", {"userId": "s1", "messageId": "id",
                                                    "traits": {"email": f"x@{STAFF}"}}) == 200
        await until(lambda: client.hget("relay:u:s1", "i") is not None, 5, "the verdict shipped")
        for n in range(100):
            assert await post(http, b, "/v1/track", {"userId": "s1", "event": "E",
                                                     "messageId": f"s{n}"}) == 200
        assert await post(http, a, "/v1/group", {"userId": "u1", "groupId": "g2",
                                                 "timestamp": "2026-12-07T10:00:10.000Z"}) == 200
        await until(lambda: client.hget("relay:u:u1", "g") == "g2", 5, "g2 shipped")
        assert await post(http, b, "/v1/group", {"userId": "u1", "groupId": "g1",
                                                 "timestamp": "2026-12-07T10:00:05.000Z"}) == 200
        for relay in (a, b):
            assert await post(http, relay, "/v1/track", {"userId": "u1", "event": "E",
                                                         "messageId": f"t-{relay.port}"}) == 200
    got = await upstream.wait_for(4)  # two group calls, two tracks: the staff's none
    await asyncio.sleep(0.3)
    assert not [m for m in upstream.accepted() if m["messageId"].startswith("s")]
    assert sorted(m["context"]["groupId"] for m in got if m["type"] == "track") == ["g2", "g2"]


async def test_redis_killed_under_load_on_two_relays_loses_nothing_and_converges(
        spawn, upstream, redis_server):
    """Under load on two relays, redis-server is killed by its pid and started again empty: no
    answer but 200, every accepted message delivered, and the groups each relay took while
    Redis was gone are in Redis once it is back."""
    a, b = spawn(1), spawn(2)
    await a.wait_ready()
    await b.wait_ready()
    client = redis_server.client()
    async with Load(a.url, senders=3, tag="ka") as on_a, Load(b.url, senders=3, tag="kb") as on_b, \
            aiohttp.ClientSession() as http:
        assert await acks_grow(on_a, 0.5) > 0 and await acks_grow(on_b, 0.5) > 0
        redis_server.kill()
        assert await post(http, a, "/v1/group", {"userId": "ua", "groupId": "ga"}) == 200
        assert await post(http, b, "/v1/group", {"userId": "ub", "groupId": "gb"}) == 200
        assert await acks_grow(on_a, 1.0) > 0 and await acks_grow(on_b, 1.0) > 0
        redis_server.start()
        client = redis_server.client()
        assert await acks_grow(on_a, 1.0) > 0 and await acks_grow(on_b, 1.0) > 0
    assert on_a.statuses == Counter() and on_b.statuses == Counter()
    acked = on_a.acked | on_b.acked
    missing = await wait_delivered(upstream, acked, 30.0)
    assert not missing, f"{len(missing)} of {len(acked)} never arrived"
    await until(lambda: client.hget("relay:u:ua", "g") == "ga"
                and client.hget("relay:u:ub", "g") == "gb", 10, "the groups back in Redis")
    for relay in (a, b):
        assert "Redis does not answer" in relay.output_of_last_start()
        assert "Redis answers again" in relay.output_of_last_start()
    print("figures:", json.dumps({"test": "redis_killed_two_relays", "acked": len(acked)}))


async def test_two_workers_through_a_redis_kill_and_kill_9(spawn, upstream, redis_server):
    """A relay of `workers: 2`: both serve the port; redis-server killed and started again under
    load, then the relay killed with SIGKILL (its workers follow) and started again: no answer
    but 200 while it ran, every accepted message delivered; SIGHUP reloads both workers, and
    SIGTERM then ends it with 0."""
    relay = spawn(1, workers=2)
    await relay.wait_ready()
    async with Load(relay.url, senders=6, tag="w") as load:
        assert await acks_grow(load, 1.0) > 0
        redis_server.kill()
        assert await acks_grow(load, 1.0) > 0
        redis_server.start()
        assert await acks_grow(load, 1.0) > 0
        workers = relay.serving_pids()
        assert len(workers) == 2
        relay.kill_and_wait()
        await until(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 15,
                    "the workers ended with the relay")
        await load.stop()
    assert set(load.statuses) <= {200}
    log = relay.output()
    assert "[worker 1]" in log and "[worker 2]" in log
    relay.spawn()
    await relay.wait_ready()
    missing = await wait_delivered(upstream, load.acked, 30.0)
    assert not missing, f"{len(missing)} of {len(load.acked)} never arrived"

    def logged(worker: int, what: str) -> bool:
        return any(f"[worker {worker}]" in line and what in line
                   for line in relay.output_of_last_start().splitlines())

    def reloaded(worker: int) -> bool:
        return logged(worker, "reload (SIGHUP)")

    # /readyz answers once one worker listens; a SIGHUP before the other does is ignored there.
    await until(lambda: logged(1, "listening on") and logged(2, "listening on"), 10,
                "both workers listening")
    relay.send(signal.SIGHUP)

    await until(lambda: reloaded(1) and reloaded(2), 10, "both workers reloaded")
    assert await relay.wait_exit(0.5) is None  # SIGHUP reloads; it does not stop relay
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(15.0) == 0, relay.output_of_last_start()
