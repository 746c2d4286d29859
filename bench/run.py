"""relay against the baselines users would run instead, in one command (issue 4).

    python bench/run.py [--quick] [--rounds N] [--out bench/results.md]

Starts on 127.0.0.1, each as a process: a fake vendor, relay (the rules of config/relay.yaml,
storage.synchronous full, a fresh SQLite file), a parse-only aiohttp server, nginx passing
requests through to the vendor, and the simplest aiohttp pass-through proxy; loads them with
wrk (or the aiohttp generator where wrk is missing); stops them all at the end, also on an
error or Ctrl-C. Every message relay answered 200 for must reach the vendor: if one does not,
the run fails with exit code 1. Speed never fails a run; it is reported as ratios to the
baselines in bench/results.md and bench/results.png. --quick is the CI smoke: tiny sizes, one
round, correctness only, nothing written unless --out is given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import backends, backlog, harness, report, scenarios, services
from bench.harness import RELAY, Bench, Undelivered
from bench.scenarios import Figure, Plan, say

FULL = Plan(rounds=3, seconds=3.0, outage_seconds=6.0, backlog=1_000_000, fill_seconds=30.0)
QUICK = Plan(rounds=1, seconds=2.0, outage_seconds=4.0, backlog=20_000, fill_seconds=10.0,
             quick=True)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: tiny sizes, one round, correctness only (under a minute)")
    parser.add_argument("--rounds", type=int,
                        help="rounds per scenario (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="the markdown to write (default"
                        " bench/results.md, with bench/results.png beside it; none with --quick)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install wrk or nginx when they are missing")
    parser.add_argument("--no-wrk", action="store_true",
                        help="load with the aiohttp generator even where wrk is installed")
    return parser.parse_args()


def plan_for(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = Plan(max(args.rounds, 1), plan.seconds, plan.outage_seconds, plan.backlog,
                    plan.fill_seconds, plan.quick)
    return plan


async def scenarios_all(bench: Bench, plan: Plan) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    if not plan.quick:
        await scenarios.warm_up(bench)
    figures["track"] = await scenarios.track(bench, plan)
    figures["batch"] = await scenarios.batch(bench, plan)
    figures["latency"] = await scenarios.latency(bench, plan, figures["track"].median(RELAY))
    figures["outage"] = await backlog.outage(bench, plan, figures["batch"])
    figures["backlog"] = await backlog.million(bench, plan, figures["batch"])
    figures.update(await backends.several(bench, plan))
    return figures


def setup_lines(bench: Bench, plan: Plan) -> list[tuple[str, str]]:
    load = (f"wrk, {scenarios.TRACK_CONNECTIONS} connections for single events,"
            f" {scenarios.BATCH_CONNECTIONS} for batches" if bench.wrk else
            "the aiohttp generator (wrk not installed)")
    return [
        ("relay", "`python -m relay serve` with the rules of config/relay.yaml, storage.synchronous"
                  " full in a fresh SQLite file; backoff capped at 1 s (shipped: 60 s)"),
        ("baselines", ", ".join(bench.baselines) + "; all forward to (or stand in for) the same"
                      " fake vendor, an aiohttp process counting unique messageIds"),
        ("load", load + "; p99 at half load from " + ("wrk, each connection pausing after every"
                        " answer to hold the rate" if bench.wrk else "the aiohttp generator at a"
                        " fixed rate") + f", {scenarios.LATENCY_CONNECTIONS} connections"),
        ("rounds", f"{plan.rounds}, each target once per round, order rotated; medians quoted"),
        ("durations", f"{plan.seconds:.0f} s per throughput/latency run; outage run"
                      f" {plan.outage_seconds:.0f} s; backlog of {plan.backlog:,}, filled by load"
                      f" for at most {plan.fill_seconds:.0f} s"),
        ("messages", "a B2B mix: tracks, 1 in 20 a group call, 1 in 50 an identify with an"
                     " email; 5,000 users; none dropped by the rules; unique messageIds; as"
                     " SDKs send them, a sentAt (per batch, or per single call) and each"
                     " message a timestamp of its own, to the millisecond"),
    ]


def relay_notes(figures: dict[str, Figure]) -> list[str]:
    notes = []
    for figure in figures.values():
        for run in figure.runs:
            if run.target == RELAY and (run.non200 or run.errors):
                notes.append(f"relay answered {run.non200} requests with a status other than 200"
                             f" and left {run.errors} unanswered in run {run.tag}"
                             f" ({figure.title})")
    return notes


def write(figures: dict[str, Figure], bench: Bench, plan: Plan, *, out: Path | None,
          started: float, load_before: str, ticks_before: tuple[int, int] | None,
          notes: list[str]) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png") if out else bench.procs.workdir / "results.png"
    drawn = report.chart({k: f for k, f in figures.items() if k in report.LABELS},
                         bench.baselines, png)
    if not drawn:
        notes.append("no chart: matplotlib is not installed (pip install matplotlib)")
    info = {
        "run": [("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
                ("command", "python bench/run.py " + " ".join(sys.argv[1:])),
                ("took", f"{time.monotonic() - started:.0f} s"),
                ("load average (1 min) before and after",
                 f"{load_before}, {report.load()} ({report.busy_before(load_before)})"),
                ("CPU time stolen by the host during the run", report.stolen(ticks_before)
                 + " (a virtual machine's share taken by others; latency suffers first)")],
        "machine": report.machine(),
        "versions": report.versions(services.nginx_binary(False), bench.wrk),
        "setup": setup_lines(bench, plan),
    }
    text = report.markdown(figures, info, notes, png.name if drawn else None, plan.quick)
    say("\n" + text)
    if out:
        out.write_text(text)
        say(f"bench: wrote {out}" + (f" and {png}" if drawn else ""))
    else:
        say("bench: results not written (--quick; pass --out to keep them)")


async def run(args: argparse.Namespace, procs: services.Procs, started: float) -> None:
    plan = plan_for(args)
    load_before = report.load()
    ticks_before = report.cpu_ticks()
    bench = await asyncio.to_thread(harness.start, procs, not args.no_install, not args.no_wrk)
    notes = [bench.nginx_note] if bench.nginx_note else []
    if bench.wrk is None:
        notes.append("wrk is not installed: the aiohttp generator made the load")
    async with aiohttp.ClientSession() as session:
        bench.session = session
        figures = await scenarios_all(bench, plan)
        queue = await bench.relay_queue()
        if queue.get("relay_outbox_messages") or queue.get("relay_dead_letters_total"):
            raise Undelivered(f"relay's queue is not empty at the end: {queue}")
        if not queue:
            notes.append("relay's /metrics did not answer: its queue was not checked at the end")
    notes += bench.notes + relay_notes(figures)
    notes.append("every message relay answered 200 for reached the fake vendor, in every run")
    out = args.out or (None if plan.quick else Path(__file__).parent / "results.md")
    write(figures, bench, plan, out=out, started=started, load_before=load_before,
          ticks_before=ticks_before, notes=notes)


def main() -> int:
    args = arguments()
    started = time.monotonic()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started with SIGINT ignored (a background job)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        procs = services.Procs(Path(tmp))
        try:
            asyncio.run(run(args, procs, started))
        except Undelivered as exc:
            print(f"\nBENCH FAILED: messages relay accepted were lost: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nbench: interrupted; stopping everything", file=sys.stderr)
            return 130
        except Exception as exc:
            print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            for proc in procs.running:
                if proc.popen.poll() is not None:
                    print(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}",
                          file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    say(f"bench: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
