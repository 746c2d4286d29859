"""How much Redis memory each user takes with `state.backend: redis`, for sizing it.

    python bench/redis_size.py [--users 20000]

Starts Debian's redis-server on a free port and relay in-process with the rules of
config/relay.yaml, sends each user what a B2B app does (an identify with an email and an
anonymousId, a group call, tracks; every tenth user in a second group), waits until relay's
journal has reached Redis, and prints Redis's used_memory per user (and per key kind).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import app, server
from relay.config import model as config


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def batch(first: int, count: int) -> dict[str, object]:
    """The calls of users first..first+count: the B2B mix of one user each."""
    calls: list[dict[str, object]] = []
    for n in range(first, first + count):
        user, anon = f"user-{n:08d}", f"3f2a9c1e-{n:012d}"
        calls.append({"type": "identify", "userId": user, "anonymousId": anon,
                      "traits": {"email": f"{user}@customer.example"}})
        calls.append({"type": "group", "userId": user, "groupId": f"company-{n % 997}"})
        if n % 10 == 0:
            calls.append({"type": "group", "userId": user, "groupId": f"company-{n % 991}x"})
        calls += [{"type": "track", "userId": user, "anonymousId": anon, "event": "Viewed"}] * 3
    return {"batch": calls}


async def fill(listener: server.Listener, users: int) -> None:
    url = f"http://127.0.0.1:{listener.port}/v1/batch"
    async with aiohttp.ClientSession() as http:
        for first in range(0, users, 50):
            async with http.post(url, json=batch(first, min(50, users - first))) as resp:
                assert resp.status == 200, await resp.text()


async def drained(listener: server.Listener) -> None:
    """Waits until relay's journal has reached Redis."""
    state = listener.application[app.RELAY].state
    for _ in range(6000):
        rows = await state.connection.execute_fetchall("SELECT count(*) FROM state_journal")
        if not next(iter(rows))[0]:
            return
        await asyncio.sleep(0.1)


SHIPPED = Path(__file__).resolve().parent.parent / "config" / "relay.yaml"


async def measure(users: int, folder: Path, redis_port: int) -> None:
    path = folder / "relay.yaml"
    path.write_text(f"""
storage: {{path: "{folder / 'relay.db'}", synchronous: normal}}
state: {{backend: redis, url: "redis://127.0.0.1:{redis_port}/0"}}
upstreams: [{{name: seg, kind: segment, url: "http://127.0.0.1:{free_port()}"}}]
""")
    shipped = config.load(str(SHIPPED))
    cfg = dataclasses.replace(config.load(str(path)), rules=shipped.rules)
    client = redis.Redis(port=redis_port)
    before = client.info("memory")["used_memory"]
    listener = server.Listener(app.build(cfg), cfg)
    await listener.start(port=0)
    try:
        started = time.monotonic()
        await fill(listener, users)
        await drained(listener)
        took = time.monotonic() - started
    finally:
        await listener.close()
    after = client.info("memory")["used_memory"]
    kinds: dict[str, int] = {}
    for key in client.scan_iter(count=1000):
        kind = key.decode().split(":")[1] if b":" in key else key.decode()
        kinds[kind] = kinds.get(kind, 0) + (client.memory_usage(key) or 0)
    print(f"{users} users in {took:.1f} s: Redis used_memory grew by {after - before:,} bytes,"
          f" {(after - before) / users:.0f} bytes per user")
    for kind, size in sorted(kinds.items()):
        print(f"  keys {kind}:*: {size / users:.0f} bytes per user (MEMORY USAGE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("needs Debian's redis-server (apt-get install -y redis-server)")
    folder = Path(tempfile.mkdtemp(prefix="relay-redis-size-"))
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        asyncio.run(measure(args.users, folder, port))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
