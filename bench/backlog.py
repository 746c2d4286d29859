"""The scenarios only relay can play: the vendor down and back, and a queue of a million.

Both load relay with the aiohttp generator, which knows which request was answered 200 when,
and time the drain on the fake vendor's clock (when each messageId first arrived; the
monotonic clock is the machine's, so the harness and the vendor share it), so nothing polls
relay while it drains. Baselines cannot buffer (nginx and the pass-through answer 502 while
the vendor is down), so relay's drain rate is compared with what each baseline moves in the
batch scenario.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import RELAY, Bench
from bench.loads import Generator, batch_shape
from bench.scenarios import BATCH, BATCH_CONNECTIONS, Figure, Plan, describe, say

FILL_BATCH = 500
FILL_CONNECTIONS = 8


def against_batch(figure: Figure, batch: Figure) -> None:
    figure.baselines = {name: list(values) for name, values in batch.baselines.items()}
    figure.baseline_note = "baselines: their messages/s in the batch scenario (they cannot buffer)"


async def arrived(bench: Bench, tag: str, requests: list[int], per_request: int,
                  seconds: float) -> dict[str, Any]:
    """Waits until the vendor holds every message of `requests`; their first and last arrival."""
    deadline = time.monotonic() + seconds
    while True:
        got = await bench.check(tag, requests, per_request)
        if not got["missing"] or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


async def outage_round(bench: Bench, plan: Plan) -> dict[str, float]:
    """Batches as fast as relay takes them; the vendor down for the first half, then back."""
    tag = await bench.tag("out", RELAY)
    generator = Generator(RELAY, bench.urls[RELAY], batch_shape(BATCH), tag, BATCH_CONNECTIONS)
    await bench.vendor("POST", "/down")
    load = asyncio.create_task(generator.closed(plan.outage_seconds))
    try:
        await asyncio.sleep(plan.outage_seconds / 2)
        back = time.monotonic()
        await bench.vendor("POST", "/up")
        run = await load
    finally:
        load.cancel()
        await bench.vendor("POST", "/up")
    waiting = sorted(n for n, at in generator.ok_at.items() if at < back)
    got = await arrived(bench, tag, waiting, BATCH, 60.0)
    delivery = await bench.delivered(run, seconds=60.0)
    say(describe(run, delivery))
    if not waiting or got["missing"]:
        return {}
    queued = len(waiting) * BATCH
    drain = got["last"] - got["first"]
    figures = {"queued": queued, "wait": got["first"] - back, "drain": drain,
               "rate": queued / drain if drain > 0 else 0.0,
               "in_load": float(got["last"] < back + plan.outage_seconds / 2)}
    say(f"    {queued} messages accepted while the vendor was down; first delivered"
        f" {figures['wait']:.2f}s after it returned, all {drain:.2f}s later"
        f" ({figures['rate']:.0f} msg/s), "
        + ("while the load went on" if figures["in_load"] else "once the load had ended"))
    return figures


async def outage(bench: Bench, plan: Plan, batch: Figure) -> Figure:
    """How fast relay drains what it queued during an outage, while the load goes on."""
    figure = Figure("outage", "vendor down for the first half of a batch load, then back",
                    "messages/s drained", higher_is_better=True)
    say(f"\n== {figure.title}: {plan.rounds} round(s) of {plan.outage_seconds:.0f}s,"
        f" {BATCH_CONNECTIONS} connections (aiohttp generator)")
    rounds = [got for _ in range(plan.rounds) if (got := await outage_round(bench, plan))]
    figure.relay = [r["rate"] for r in rounds]
    against_batch(figure, batch)
    if rounds:
        med = statistics.median
        figure.details += [
            ("messages queued while the vendor was down",
             f"{med(r['queued'] for r in rounds):,.0f}"),
            ("first delivery after the vendor returned (s; backoff capped at 1 s)",
             f"{med(r['wait'] for r in rounds):.2f}"),
            ("from first to last of them delivered (s)", f"{med(r['drain'] for r in rounds):.2f}"),
            ("drained while the load still ran", f"{sum(r['in_load'] for r in rounds):.0f} of"
                                                 f" {len(rounds)} rounds"),
        ]
    return figure


def top_up(db: Path, count: int, tag: str) -> int:
    """Adds `count` copies of the newest queued message, each with its own messageId
    `{tag}-s{k}`, to relay's outbox as relay stores them (one row a message); 0 when the
    outbox is not laid out so, or cannot be written."""
    if count <= 0:
        return 0
    try:
        with sqlite3.connect(db, timeout=30, isolation_level=None) as conn:
            row = conn.execute("SELECT upstream, write_key, user_key, body FROM outbox"
                               " ORDER BY id DESC LIMIT 1").fetchone()
            upstream, key, user, body = row
            old = json.loads(body)["messageId"]
            now = time.time()
            for start in range(0, count, 50_000):
                rows = [(upstream, key, user, body.replace(old, f"{tag}-s{k}"), now)
                        for k in range(start, min(start + 50_000, count))]
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO outbox (upstream, write_key, user_key, body,"
                                 " enqueued_at) VALUES (?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
        conn.close()
    except (sqlite3.Error, TypeError, KeyError, ValueError) as exc:
        say(f"  cannot write into relay's outbox ({exc}); the backlog is what the load queued")
        return 0
    return count


async def rss_mb(bench: Bench) -> float:
    """relay's VmRSS in MB (its own process and the writer process together), the median of
    three readings over a second."""
    readings = []
    for _ in range(3):
        readings.append(bench.relay_rss()["VmRSS"] / 1024)
        await asyncio.sleep(0.5)
    return statistics.median(readings)


async def drained(bench: Bench, tag: str, total: int, seconds: float) -> dict[str, Any]:
    """Waits until the vendor holds `total` messages of `tag`; its stats then."""
    deadline = time.monotonic() + seconds
    while True:
        stats = await bench.received(tag)
        if stats["unique"] >= total or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


async def million(bench: Bench, plan: Plan, batch: Figure) -> Figure:
    """relay's memory with `plan.backlog` messages queued against none, and the drain."""
    figure = Figure("backlog", f"a backlog of {plan.backlog:,} messages", "messages/s drained",
                    higher_is_better=True)
    say(f"\n== {figure.title}: filled by load for at most {plan.fill_seconds:.0f}s")
    empty = await rss_mb(bench)
    await bench.vendor("POST", "/down")
    tag = await bench.tag("mil", RELAY)
    generator = Generator(RELAY, bench.urls[RELAY], batch_shape(FILL_BATCH), tag, FILL_CONNECTIONS)
    try:
        run = await generator.closed(plan.fill_seconds, requests=plan.backlog // FILL_BATCH)
        say(describe(run))
        seeded = await asyncio.to_thread(top_up, bench.db, plan.backlog - run.accepted, tag)
        total = run.accepted + seeded
        say(f"  queued {run.accepted:,} by load in {run.seconds:.1f}s ({run.mps:.0f} msg/s),"
            f" {seeded:,} more written into the outbox directly: {total:,} waiting")
        full = await rss_mb(bench)
        say(f"  relay RSS: {empty:.1f} MB with an empty queue, {full:.1f} MB with {total:,}")
    finally:
        back = time.monotonic()
        await bench.vendor("POST", "/up")
    stats = await drained(bench, tag, total, 240.0)
    delivery = await bench.delivered(run, seconds=10.0)
    if stats["unique"] < total:
        raise AssertionError(f"the vendor got {stats['unique']:,} of the {total:,} messages"
                             " queued in relay within 240s")
    after = await rss_mb(bench)
    peak = bench.relay_rss()["VmHWM"] / 1024
    drain = stats["last"] - stats["first"]
    rate = total / drain if drain > 0 else 0.0
    say(f"  delivered all {delivery.received:,}: the first {stats['first'] - back:.2f}s after the"
        f" vendor returned, the last {drain:.1f}s later: {rate:.0f} msg/s;"
        f" RSS after {after:.1f} MB, peak {peak:.1f} MB")
    figure.relay.append(rate)
    figure.runs.append(run)
    against_batch(figure, batch)
    figure.details += [
        ("messages queued", f"{total:,} ({run.accepted:,} by load at {run.mps:,.0f} msg/s,"
                            f" {seeded:,} written into the outbox directly)"),
        ("RSS with an empty queue (MB)", f"{empty:.1f}"),
        ("RSS with the backlog (MB)", f"{full:.1f}"),
        ("RSS after the drain (MB)", f"{after:.1f}"),
        ("peak RSS of the whole run, VmHWM (MB)", f"{peak:.1f}"),
        ("first delivery after the vendor returned (s)", f"{stats['first'] - back:.2f}"),
        ("from first to last delivered (s)", f"{drain:.1f}"),
    ]
    figure.numbers.update(empty=empty, full=full, after=after, peak=peak, queued=total)
    return figure
