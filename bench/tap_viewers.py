"""The tap's viewers in bench/tap.py: one that reads the stream as fast as it comes, and ones
that connect and never read; and what relay says and holds of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.services import HOST

TOKEN = "bench-tap-admin-token-0123456789"
RCVBUF = 4096  # each slow viewer's receive buffer (the kernel doubles it)


@dataclass
class Reader:
    """C's viewer: reads the stream as fast as it comes and counts what it is sent; opens it
    again when relay drops it (as the page's EventSource would)."""

    events: Counter[str] = field(default_factory=Counter)
    received: int = 0  # bytes
    shares: list[float] = field(default_factory=list)  # from the `sampling` events
    bye: str = ""  # why relay last dropped it

    async def watch(self, session: aiohttp.ClientSession, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/admin/tap", timeout=timeout,
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
                    answer.raise_for_status()
                    buffer = b""
                    async for chunk in answer.content.iter_any():
                        self.received += len(chunk)
                        *events, buffer = (buffer + chunk).split(b"\n\n")
                        for event in events:
                            self.take(event)
            await asyncio.sleep(0.1)

    def take(self, event: bytes) -> None:
        found = re.search(rb"^event: (\S+)\ndata: (.*)$", event, re.MULTILINE)
        if found is not None:  # else a keepalive comment
            kind, data = found[1].decode(), found[2]
            self.events[kind] += 1
            if kind == "sampling":
                self.shares.append(json.loads(data)["share"])
            elif kind == "bye":
                self.bye = json.loads(data)["reason"]


def slow_viewers(port: int, count: int) -> list[socket.socket]:
    """`count` streams of /admin/tap of which the answer's first bytes are read, nothing more."""
    socks = []
    for _ in range(count):
        socks.append(sock := socket.socket())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.settimeout(10)
        sock.connect((HOST, port))
        sock.sendall(f"GET /admin/tap HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        if not sock.recv(12).startswith(b"HTTP/1.1 200"):
            raise RuntimeError("a slow viewer was not answered 200")
    return socks


def sockets(port: int, ports: set[int]) -> tuple[int, int]:
    """Of relay's connections on `port` to the slow viewers (whose local ports are `ports`): how
    many are open, and the bytes the kernel holds to send on them (/proc/net/tcp's tx_queue)."""
    count = queued = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(fields[i].split(":")[1], 16) for i in (1, 2))
        if local == port and remote in ports and fields[3] == "01":  # ESTABLISHED
            count += 1
            queued += int(fields[4].split(":")[0], 16)
    return count, queued


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """relay's tap viewers, queued messages and dead letters, from its /metrics."""
    async with session.get(url + "/metrics") as answer:
        text = await answer.text()
    return {name: sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                                    re.MULTILINE))
            for name in ("relay_tap_viewers", "relay_outbox_messages", "relay_dead_letters_total")}


async def viewers(session: aiohttp.ClientSession, url: str, count: int) -> None:
    """Waits (10 s at most) until the relay at `url` reads `count` in relay_tap_viewers."""
    deadline, seen = time.monotonic() + 10, -1.0
    while time.monotonic() < deadline:
        if (seen := (await metrics(session, url))["relay_tap_viewers"]) == count:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url}: {seen:.0f} viewers open, not {count}")
