"""Several relays' ways, in the same run as the rest: relay with its user state in Redis against
relay with it in SQLite (single events and batches: requests/s, and the CPU each message costs
relay's main thread and all its processes), and relay of two workers against one, on batches.

Starts Debian's redis-server and two more relays beside the benchmark's own (which keeps its
state in SQLite): `relay-redis` (one process) and `relay-2w` (`workers: 2`), each on its own
port and files, forwarding to the same fake vendor. Every message each answered 200 for must
reach it, as for the benchmark's relay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from bench import services
from bench.harness import PARSE, RELAY, Bench
from bench.loads import TRACK_SHAPE, Shape, batch_shape
from bench.scenarios import (
    BATCH,
    BATCH_CONNECTIONS,
    TRACK_CONNECTIONS,
    Figure,
    Plan,
    checked,
    describe,
    rotation,
    say,
)

REDIS = "relay-redis"
TWO = "relay-2w"
TICK = os.sysconf("SC_CLK_TCK")


def start(bench: Bench) -> str | None:
    """Redis and the two relays of this scenario; why not, when redis-server is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        services.apt_install("redis-server")
        binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not installed: no Redis or worker figures"
    port = services.free_port()
    redis = bench.procs.start("redis", [binary, "--port", str(port), "--save", "",
                                        "--appendonly", "no", "--dir", str(bench.procs.workdir)])
    services.wait_port(redis, port)
    vendor = bench.relay_config["upstreams"][0]["url"]
    for name, workers in ((REDIS, 1), (TWO, 2)):
        folder = bench.procs.workdir / name
        folder.mkdir()
        listen = services.free_port()
        config: dict[str, Any] = {
            **bench.relay_config, "listen": f"{services.HOST}:{listen}", "workers": workers,
            "storage": {**bench.relay_config["storage"], "path": str(folder / "relay.db")},
            "state": {"backend": "redis", "url": f"redis://{services.HOST}:{port}/0",
                      "key_prefix": f"{name}:"},
            "upstreams": [{**bench.relay_config["upstreams"][0], "url": vendor}]}
        path = folder / "relay.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = bench.procs.start(name, [sys.executable, "-m", "relay", "serve", "--config",
                                        str(path)], env={"RELAY_LOG_LEVEL": "WARNING"})
        services.wait_port(proc, listen)
        bench.urls[name] = f"http://{services.HOST}:{listen}"
        bench.pids[name] = proc.popen.pid
    return None


def cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of `pid` and all its descendants, and of their main threads alone (the
    event loops: relay's, or each worker's)."""
    total = main = 0.0
    for each in _tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            main_ns = int(Path(f"/proc/{each}/task/{each}/schedstat").read_text().split()[0])
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
        if "relay serve" in _cmdline(each) and not _has_serving_children(each):
            main += main_ns / 1e9
    return total, main


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        each = todo.pop()
        out.append(each)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in
                     Path(f"/proc/{each}/task/{each}/children").read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _has_serving_children(pid: int) -> bool:
    """A supervisor of workers: its own loop is not where messages are handled."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    return any("relay serve" in _cmdline(int(c)) for c in children)


async def compare(bench: Bench, plan: Plan, key: str, shape: Shape, *,
                  targets: list[str], judged: str) -> Figure:
    """Each of `targets` loaded in turn for `plan.rounds` rounds with `shape`; the figure
    judges `judged` against the others, with each relay's CPU per message."""
    single = shape.per_request == 1
    title = (f"{'single events' if single else f'{shape.per_request}-message batches'}:"
             f" {judged} against {', '.join(t for t in targets if t != judged)}")
    figure = Figure(key, title, "requests/s" if single else "messages/s", higher_is_better=True,
                    name=judged)
    connections = TRACK_CONNECTIONS if single else BATCH_CONNECTIONS
    say(f"\n== {title}: {plan.rounds} round(s) of {plan.seconds:.0f}s")
    spent: dict[str, list[tuple[float, float]]] = {}
    for index in range(plan.rounds):
        for target in rotation(targets, index):
            pid = bench.pids.get(target)
            before = cpu(pid) if pid else (0.0, 0.0)
            tag = await bench.tag(key, target)
            run = await bench.load(target, shape, tag, plan.seconds, connections)
            after = cpu(pid) if pid else (0.0, 0.0)
            say(describe(run, await checked(bench, run)))
            value = run.rps if single else run.mps
            (figure.relay if target == judged else figure.baselines.setdefault(target, [])
             ).append(value)
            figure.runs.append(run)
            if pid and run.accepted:
                spent.setdefault(target, []).append(
                    ((after[0] - before[0]) / run.accepted * 1e6,
                     (after[1] - before[1]) / run.accepted * 1e6))
    for target, values in spent.items():
        all_us = statistics.median(v[0] for v in values)
        main_us = statistics.median(v[1] for v in values)
        figure.numbers[f"{target} cpu"] = all_us
        figure.numbers[f"{target} main"] = main_us
        figure.details.append((f"{target}: CPU per message, all its processes / its event"
                               " loops (median of the rounds)", f"{all_us:.1f} / {main_us:.1f} µs"))
    return figure


async def several(bench: Bench, plan: Plan) -> dict[str, Figure]:
    """The backends' and the workers' figures (none when Redis could not be had)."""
    why = start(bench)
    if why is not None:
        say(f"\nbench: {why}")
        bench.notes.append(why)
        return {}
    batch = batch_shape(BATCH)
    return {
        "redis-track": await compare(bench, plan, "redistrack", TRACK_SHAPE,
                                     targets=[RELAY, REDIS], judged=REDIS),
        "redis-batch": await compare(bench, plan, "redisbatch", batch, targets=[RELAY, REDIS],
                                     judged=REDIS),
        "workers": await compare(bench, plan, "workers", batch,
                                 targets=[TWO, REDIS, RELAY, PARSE], judged=TWO),
    }
