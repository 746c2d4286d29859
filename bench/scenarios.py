"""The throughput and latency scenarios, run alternately against relay and each baseline.

Each round runs every target once, starting one further along the list each round, so that a
drift of the shared machine touches all targets alike; the figure quoted is the median of the
rounds. After each relay run the harness waits for the vendor to hold every message relay
answered 200 for (`Bench.delivered`), which also leaves relay idle for the next run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.harness import RELAY, Bench, Delivery
from bench.loads import TRACK_SHAPE, RunResult, Shape, batch_shape

BATCH = 100
TRACK_CONNECTIONS = 64
BATCH_CONNECTIONS = 16
LATENCY_CONNECTIONS = 64
WARM_UP = 0.5  # seconds of each latency run sent but not timed (connections being opened)


@dataclass
class Plan:
    """Sizes and durations of one benchmark run."""

    rounds: int
    seconds: float  # each throughput and latency run
    outage_seconds: float  # the outage run; the vendor is down for its first half
    backlog: int  # messages the backlog scenario queues up
    fill_seconds: float  # at most this long loading relay for the backlog
    quick: bool = False


@dataclass
class Figure:
    """One scenario's headline figure: relay's per round, and each baseline's."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    name: str = RELAY  # the target judged against the others (bench.backends: another relay)
    relay: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)
    baseline_note: str = ""  # where the baselines' figures come from, when not this scenario
    runs: list[RunResult] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)  # further figures, as text
    numbers: dict[str, float] = field(default_factory=dict)  # figures the targets read

    def median(self, target: str) -> float:
        values = self.relay if target == self.name else self.baselines.get(target, [])
        return statistics.median(values) if values else 0.0

    def ratio(self, baseline: str) -> float | None:
        """relay's median ÷ the baseline's."""
        base = self.median(baseline)
        return self.median(self.name) / base if base else None


def say(text: str) -> None:
    print(text, flush=True)


def describe(run: RunResult, delivery: Delivery | None = None) -> str:
    line = (f"  {run.target:12} {run.rps:9.0f} req/s {run.mps:10.0f} msg/s"
            f"  p50 {run.p50 * 1e3:7.1f} ms  p99 {run.p99 * 1e3:7.1f} ms"
            f"  non-200 {run.non200}  errors {run.errors}")
    if delivery is not None:
        line += f"  delivered {delivery.received}/{delivery.expected} (+{delivery.seconds:.1f}s)"
    return line


def rotation(targets: list[str], round_index: int) -> list[str]:
    shift = round_index % len(targets)
    return targets[shift:] + targets[:shift]


async def checked(bench: Bench, run: RunResult) -> Delivery | None:
    """For relay's runs: waits until the vendor has all it accepted (raises if it does not)."""
    if not run.target.startswith(RELAY):
        return None
    return await bench.delivered(run, seconds=max(30.0, run.accepted / 2000))


async def throughput(bench: Bench, plan: Plan, key: str, shape: Shape) -> Figure:
    """The most each target takes (closed loop) of one kind of request."""
    single = shape.per_request == 1
    figure = Figure(key, "single events to /v1/track" if single
                    else f"{shape.per_request}-message batches to /v1/batch",
                    "requests/s" if single else "messages/s", higher_is_better=True)
    connections = TRACK_CONNECTIONS if single else BATCH_CONNECTIONS
    say(f"\n== {figure.title}: {plan.rounds} round(s) of {plan.seconds:.0f}s,"
        f" {connections} connections ({'wrk' if bench.wrk else 'aiohttp generator'})")
    for index in range(plan.rounds):
        for target in rotation(bench.targets, index):
            tag = await bench.tag(key, target)
            run = await bench.load(target, shape, tag, plan.seconds, connections)
            say(describe(run, await checked(bench, run)))
            value = run.rps if single else run.mps
            if target == RELAY:
                figure.relay.append(value)
            else:
                figure.baselines.setdefault(target, []).append(value)
            figure.runs.append(run)
    return figure


async def warm_up(bench: Bench) -> None:
    """Short runs per target, not counted: first requests pay for imports and caches (relay's
    user state among them: the batches' group calls and identifies), and a fresh SQLite file
    for growing. Each target gets the same: single events as the track scenario sends them,
    then batches."""
    say("\n== warm-up (not counted)")
    for target in bench.targets:
        for shape, seconds, connections in ((TRACK_SHAPE, 1.5, TRACK_CONNECTIONS),
                                            (batch_shape(BATCH), 1.0, BATCH_CONNECTIONS)):
            tag = await bench.tag("w", target)
            run = await bench.load(target, shape, tag, seconds, connections)
            say(describe(run, await checked(bench, run)))


async def track(bench: Bench, plan: Plan) -> Figure:
    return await throughput(bench, plan, "track", TRACK_SHAPE)


async def batch(bench: Bench, plan: Plan) -> Figure:
    return await throughput(bench, plan, "batch", batch_shape(BATCH))


async def latency(bench: Bench, plan: Plan, relay_max: float) -> Figure:
    """p99 of single events sent at about half of relay's measured maximum (see Bench.paced)."""
    rate = max(relay_max / 2, 10.0)
    figure = Figure("latency", f"p99 latency at {rate:.0f} requests/s (half of relay's maximum)",
                    "ms", higher_is_better=False)
    say(f"\n== {figure.title}: {plan.rounds} round(s) of {plan.seconds:.0f}s, paced")
    for index in range(plan.rounds):
        for target in rotation(bench.targets, index):
            tag = await bench.tag("lat", target)
            run = await bench.paced(target, TRACK_SHAPE, tag, plan.seconds,
                                    connections=LATENCY_CONNECTIONS, rate=rate, warm_up=WARM_UP)
            say(describe(run, await checked(bench, run)))
            if target == RELAY:
                figure.relay.append(run.p99 * 1e3)
            else:
                figure.baselines.setdefault(target, []).append(run.p99 * 1e3)
            figure.runs.append(run)
    held = [r.ok / r.seconds for r in figure.runs if r.target == RELAY and r.seconds]
    figure.details.append(("rate asked", f"{rate:.0f} requests/s"))
    if held:
        figure.details.append(("rate relay held (median)",
                               f"{statistics.median(held):.0f} requests/s"))
    figure.details.append(("load", "wrk, each of 64 connections pausing after every answer"
                           if bench.wrk else "the aiohttp generator, open loop"))
    return figure
