"""The cost of the rules per message: the shipped config's rules against none, same process.

    python bench/rules.py [--messages 20000] [--config config/relay.yaml]

Messages go through what ingest does to each (validate, stamp, rules, serialise), in requests
of 100 whose users' state is loaded first, with real user state in a temporary SQLite file; the
figure that matters is the ratio, as the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import clock
from relay.config import model as config
from relay.ingest import held, segment
from relay.ingest.receipt import Receipt
from relay.pipeline.runner import Pipeline, RuleContext
from relay.state.sqlite import SqliteState

ROUTE = segment.Route("/v1/batch", batch=True)
BATCH = 100  # messages per request, as the benchmark's batches


def workload(count: int) -> list[dict[str, Any]]:
    """A B2B mix: identifies with emails, group calls, and mostly tracks without a group."""
    out: list[dict[str, Any]] = []
    for i in range(count):
        user = f"user-{i % 500}"
        if i % 50 == 0:
            out.append({"type": "identify", "userId": user, "anonymousId": f"anon-{user}",
                        "traits": {"email": f"{user}@customer.com", "created_at": "2024-01-01"}})
        elif i % 20 == 0:
            out.append({"type": "group", "userId": user, "groupId": f"company-{i % 7}"})
        else:
            out.append({"type": "track", "userId": user, "event": "Report Viewed",
                        "properties": {"report": "weekly", "rows": i},
                        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}}})
    return out


async def run(steps: Pipeline, messages: list[dict[str, Any]], state: SqliteState) -> float:
    """Seconds to take every message through ingest's per-message work, in requests of
    BATCH messages: their users' state loaded for each request, as ingest does, then the
    rules over each message."""
    ctx = RuleContext(state=state, route=ROUTE.path)
    start = time.perf_counter()
    for first in range(0, len(messages), BATCH):
        ready = []
        for item in messages[first:first + BATCH]:
            message = segment.message_from(item, (), ROUTE)
            if segment.invalid_reason(message) is None:
                Receipt(clock.now(), None).stamp(message, item, None)
                ready.append(message)
        if steps.reads_state:
            await state.load(held.request_refs([(message, None) for message in ready]))
        for message in ready:
            final = steps.start(message, ctx)
            final = final if isinstance(final, dict) else final.message
            if final is not None:
                segment.dumps(final)
        state.settle()
        state.drain()
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--config", default="config/relay.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded = config.load(args.config)
    messages = workload(args.messages)
    with tempfile.TemporaryDirectory() as tmp:
        state = SqliteState(str(Path(tmp) / "state.db"))
        await state.open()
        bare, ruled = [], []
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
            bare.append(await run(Pipeline(()), messages, state))
            ruled.append(await run(Pipeline(loaded.rules), messages, state))
        await state.close()
    b, r = sorted(bare)[len(bare) // 2], sorted(ruled)[len(ruled) // 2]
    n = len(messages)
    print(f"{n} messages, {len(loaded.rules)} rules from {args.config}, median of {args.rounds}")
    print(f"  without rules: {n / b:10.0f} messages/s")
    print(f"  with rules:    {n / r:10.0f} messages/s")
    print(f"  rules cost {(r - b) / n * 1e6:.1f} µs per message; with rules runs at"
          f" {b / r:.2f}x the speed of without")
    names = [s.id for s in loaded.rules]
    print(f"  rules: {', '.join(names)}")


if __name__ == "__main__":
    asyncio.run(main())
