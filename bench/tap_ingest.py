"""What the tap costs ingest per message, in one process: `Ingest.process` over 100-message
batches of the benchmark's mix, with the shipped rules, while nobody watches, while a viewer
wants every message, and while a viewer wants one user only.

    python bench/tap_ingest.py [--messages 20000] [--rounds 7]

The three are run in turn, round after round (drift on a shared machine hits all alike); the
minimum of the rounds is quoted, the least disturbed. Tracing is capped at 50 messages a second,
so what a viewer costs here is mostly the sampling check every message passes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rules import workload
from relay.config import model as config
from relay.ingest import segment
from relay.ingest.receiver import Ingest
from relay.metrics import Metrics
from relay.pipeline.runner import Pipeline
from relay.state.sqlite import SqliteState
from relay.tap.hub import Filters, Tap
from relay.tap.watch import Watch

ROUTE = segment.Route("/v1/batch", batch=True)
BATCH = 100


async def run(ingest: Ingest, batches: list[list[dict[str, object]]]) -> float:
    """Seconds to validate, stamp, rule and serialise every batch, as ingest does (the commit
    aside), recording what the tap samples when it is watched."""
    start = time.perf_counter()
    for items in batches:
        watch = Watch(ingest.tap, ROUTE.path, "bench", ingest.pipeline) \
            if ingest.tap.watching else None
        await ingest.process(items, {}, ROUTE, None, size=30_000, key="bench", watch=watch)
        ingest.state.drain()
    return time.perf_counter() - start


def taps() -> dict[str, Tap]:
    watched, picky = Tap(), Tap()
    watched.join(Filters())
    picky.join(Filters(user="nobody"))
    return {"nobody watching": Tap(), "a viewer of every message": watched,
            "a viewer of one user": picky}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    loaded = config.load("config/relay.yaml")
    messages = workload(args.messages)
    batches = [messages[i:i + BATCH] for i in range(0, len(messages), BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        state = SqliteState(str(Path(tmp) / "state.db"))
        await state.open()
        seconds: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, tap in taps().items():
                ingest = Ingest((), Pipeline(loaded.rules), state, None,  # type: ignore[arg-type]
                                Metrics(), body_seconds=30, tap=tap)
                seconds.setdefault(name, []).append(await run(ingest, batches))
        await state.close()
    base = min(seconds["nobody watching"])
    print(f"{len(messages)} messages in batches of {BATCH}, the rules of config/relay.yaml,"
          f" minimum of {args.rounds} rounds")
    for name, runs in seconds.items():
        best = min(runs)
        print(f"  {name:28} {best / len(messages) * 1e6:6.2f} µs a message"
              f"  ({best / base:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
