"""The running benchmark: the fake vendor, relay and the baselines, and how load reaches them.

`Bench` starts everything (see `start`), runs a load against a target with wrk or, where wrk
is missing, with the aiohttp generator, talks to the fake vendor's control port, reads relay's
queue from its /metrics, and checks that every message relay answered 200 for reached the
vendor (`delivered`), raising `Undelivered` when one did not.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import services, wrk
from bench.loads import Generator, RunResult, Shape
from bench.services import HOST, Proc, Procs

RELAY = "relay"
PARSE = "parse-only"
NGINX = "nginx"
PASSTHROUGH = "passthrough"
BASELINES = (PARSE, NGINX, PASSTHROUGH)


class Undelivered(Exception):
    """relay answered 200 for messages that never reached the vendor."""


@dataclass
class Delivery:
    """How a run's messages reached the vendor."""

    expected: int
    received: int
    seconds: float  # from the end of the load until the vendor had them all


@dataclass
class Bench:
    """Everything started for one benchmark run, and the ways to load and inspect it."""

    procs: Procs
    wrk: str | None
    nginx_note: str = ""
    urls: dict[str, str] = field(default_factory=dict)
    relay: Proc | None = None
    relay_config: dict[str, Any] = field(default_factory=dict)  # the benchmark relay's config
    pids: dict[str, int] = field(default_factory=dict)  # each relay target's process
    notes: list[str] = field(default_factory=list)
    vendor_control: str = ""
    session: aiohttp.ClientSession | None = None
    _tags: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def targets(self) -> list[str]:
        return [name for name in (RELAY, *BASELINES) if name in self.urls]

    @property
    def baselines(self) -> list[str]:
        return [name for name in BASELINES if name in self.urls]

    @property
    def db(self) -> Path:
        return self.procs.workdir / "relay.db"

    async def tag(self, scenario: str, target: str) -> str:
        """A new run's tag, letters and digits only (the vendor splits messageIds on '-'); the
        vendor is told to watch relay's, to check their delivery."""
        tag = f"{scenario}{next(self._tags)}{''.join(c for c in target if c.isalnum())}"
        if target.startswith(RELAY):
            await self.vendor("POST", "/watch", params={"tag": tag})
        return tag

    async def load(self, target: str, shape: Shape, tag: str, seconds: float,
                   connections: int) -> RunResult:
        """The most the target takes in `seconds` (closed loop), with wrk where there is one."""
        url = self.urls[target]
        if self.wrk:
            return await wrk.run(self.procs, self.wrk, target, url, shape=shape, tag=tag,
                                 seconds=seconds, connections=connections)
        return await Generator(target, url, shape, tag, connections).closed(seconds)

    async def paced(self, target: str, shape: Shape, tag: str, seconds: float, *,
                    connections: int, rate: float, warm_up: float) -> RunResult:
        """About `rate` requests a second for `seconds`: wrk with a pause per connection where
        there is wrk (a Python generator sharing the two cores cannot hold the rates relay
        now reaches), else the aiohttp generator's open loop."""
        url = self.urls[target]
        if self.wrk:
            return await wrk.run(self.procs, self.wrk, target, url, shape=shape, tag=tag,
                                 seconds=seconds, connections=connections, rate=rate)
        return await Generator(target, url, shape, tag, connections).open(rate, seconds,
                                                                          warm_up=warm_up)

    async def vendor(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.session is not None
        async with self.session.request(method, self.vendor_control + path, **kwargs) as answer:
            answer.raise_for_status()
            return await answer.json()

    async def received(self, tag: str) -> dict[str, Any]:
        stats: dict[str, Any] = await self.vendor("GET", "/stats", params={"tag": tag})
        return stats

    async def delivered(self, result: RunResult, seconds: float) -> Delivery:
        """Waits (at most `seconds`) until the vendor holds every message relay answered 200
        for in `result`; raises Undelivered if it does not. Exact per messageId for the
        generator's runs; by count for wrk's (it cannot tell which request got which answer)."""
        start = time.monotonic()
        got = 0
        while True:
            got = (await self.received(result.tag))["unique"]
            if got >= result.accepted or time.monotonic() - start > seconds:
                break
            await asyncio.sleep(0.05)
        waited = time.monotonic() - start
        if got < result.accepted:
            raise Undelivered(
                f"{result.target} run {result.tag}: answered 200 for {result.accepted} messages,"
                f" the vendor got {got} unique ones within {seconds:.0f}s; relay's queue:"
                f" {await self.relay_queue()}")
        if result.ok_requests is not None:
            check = await self.check(result.tag, result.ok_requests, result.per_request)
            if check["missing"]:
                raise Undelivered(f"{result.target} run {result.tag}: {check['missing']} messages"
                                  f" answered 200 never reached the vendor, e.g."
                                  f" {check['examples']}")
        await self.vendor("POST", "/forget", params={"tag": result.tag})
        return Delivery(result.accepted, got, waited)

    async def check(self, tag: str, requests: list[int], per_request: int) -> dict[str, Any]:
        """The vendor's word on the generator's requests `requests`: missing, first, last."""
        got: dict[str, Any] = await self.vendor("POST", "/check", json={
            "tag": tag, "requests": requests, "per_request": per_request})
        return got

    async def relay_queue(self) -> dict[str, float]:
        """relay's own figures from GET /metrics: messages waiting and dead letters (summed
        over upstreams); empty when relay has no such metrics."""
        assert self.session is not None
        try:
            async with self.session.get(self.urls[RELAY] + "/metrics") as answer:
                text = await answer.text() if answer.status == 200 else ""
        except aiohttp.ClientError:
            return {}
        out: dict[str, float] = {}
        for name in ("relay_outbox_messages", "relay_dead_letters_total"):
            values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
            if values:
                out[name] = sum(float(v) for v in values)
        return out

    def relay_rss(self) -> dict[str, int]:
        """relay's memory: its own process and its children (the writer process) together."""
        assert self.relay is not None
        return services.tree_rss_kb(self.relay.popen.pid)


def start(procs: Procs, install: bool, use_wrk: bool) -> Bench:
    """The fake vendor, relay and the three baselines, each a process on its own port."""
    bench = Bench(procs, wrk.binary(install) if use_wrk else None)
    vendor_port, control = services.free_port(), services.free_port()
    vendor = services.python_server(procs, "vendor", vendor_port, "--control-port", str(control))
    services.wait_port(vendor, control)
    services.wait_port(vendor, vendor_port)
    bench.vendor_control = f"http://{HOST}:{control}"
    port = services.free_port()
    bench.relay = services.start_relay(procs, procs.workdir, port, vendor_port)
    bench.relay_config = yaml.safe_load((procs.workdir / "relay.yaml").read_text())
    bench.pids[RELAY] = bench.relay.popen.pid
    bench.urls[RELAY] = f"http://{HOST}:{port}"
    port = services.free_port()
    services.wait_port(services.python_server(procs, "parse", port), port)
    bench.urls[PARSE] = f"http://{HOST}:{port}"
    nginx = services.nginx_binary(install)
    if nginx is None:
        bench.nginx_note = "nginx is not installed and could not be installed: no nginx baseline"
        print(f"bench: {bench.nginx_note}", file=sys.stderr)
    else:
        port = services.free_port()
        services.start_nginx(procs, nginx, port, vendor_port)
        bench.urls[NGINX] = f"http://{HOST}:{port}"
    port = services.free_port()
    passthrough = services.python_server(procs, "passthrough", port, "--upstream",
                                         f"http://{HOST}:{vendor_port}")
    services.wait_port(passthrough, port)
    bench.urls[PASSTHROUGH] = f"http://{HOST}:{port}"
    return bench
