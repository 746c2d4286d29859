"""The tap's cost (issue 26, point 4): relay before the tap, and with it unwatched, watched by
one viewer and by ten that never read, loaded side by side in one run.

    python bench/tap.py [--quick] [--rounds 3] [--seconds 3] [--base 8d456f4]

Four relays on 127.0.0.1, one fake vendor, the shipped rules (bench.services.relay_config): A the
code of --base (a `git worktree`, checked to lack relay/tap, removed at the end), B, C and D a copy
of the working tree's relay/. C has a viewer reading GET /admin/tap as fast as it comes (opened
again if relay drops it); D ten that connect after the warm-up and never read. wrk loads each in
turn as bench/run.py does (single events, 64 connections; 100-message batches, 16), the order
rotated each round; every message answered 200 must reach the vendor, else exit 1. Printed: each
run, medians, ratios B/A, C/B, D/B (of medians and per round), relay's main-process CPU per request
(over a run and its delivery), RSS. --quick: one round of 1 s, no warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import yaml

from bench import report, scenarios, services, wrk
from bench.harness import RELAY, Bench, Undelivered
from bench.loads import TRACK_SHAPE, batch_shape
from bench.scenarios import say
from bench.services import HOST, ROOT, Procs
from bench.tap_viewers import RCVBUF, TOKEN, Reader, metrics, slow_viewers, sockets, viewers

SHAPES = {"track": (TRACK_SHAPE, scenarios.TRACK_CONNECTIONS),
          "batch": (batch_shape(scenarios.BATCH), scenarios.BATCH_CONNECTIONS)}
SLOW = 10  # D's viewers


@dataclass
class Target:
    """One relay under test: its code, its viewers, and what it did."""

    key: str
    name: str  # for the harness: starts with "relay", so that its deliveries are checked
    label: str
    code: Path
    viewers: int = 0
    pid: int = 0
    port: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)  # shape -> requests/s a round
    cpu: dict[str, list[float]] = field(default_factory=dict)  # shape -> µs of CPU a request
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # moment -> VmRSS, VmHWM kB
    gauge: list[float] = field(default_factory=list)  # relay_tap_viewers after each counted run
    accepted: int = 0  # messages answered 200, warm-up included
    reader: Reader | None = None  # C's viewer
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # D: `sockets` at a moment

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def git(*argv: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


def code_trees(base: str, tmp: Path) -> tuple[Path, Path]:
    """A worktree of `base` (it must lack relay/tap) and a copy of the working tree's relay/."""
    old, new = tmp / "base", tmp / "current"
    git("worktree", "add", "--detach", str(old), base)
    if (old / "relay" / "tap").exists() or not (old / "relay" / "app.py").exists():
        raise RuntimeError(f"{base} is not relay before the tap (relay/tap is there, or no relay)")
    shutil.copytree(ROOT / "relay", new / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    if not (new / "relay" / "tap" / "hub.py").exists():
        raise RuntimeError("the working tree has no relay/tap/hub.py")
    return old, new


def code_env(code: Path) -> dict[str, str]:
    """The environment in which relay, and the writer process it starts, import relay from
    `code` (checked). PYTHONSAFEPATH: the working directory, ROOT, is not put first on sys.path,
    which would import the working tree's relay whatever PYTHONPATH says."""
    env = {"PYTHONPATH": str(code), "PYTHONSAFEPATH": "1", "RELAY_LOG_LEVEL": "WARNING"}
    probe = "import relay, relay.outbox.writer_child as w; print(relay.__file__, w.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          env={**os.environ, **env}, text=True, timeout=60, check=True)
    for path in done.stdout.split():
        if not Path(path).resolve().is_relative_to(code.resolve()):
            raise RuntimeError(f"relay imported from {path}, not from {code}")
    return env


def start(procs: Procs, targets: list[Target]) -> Bench:
    """The fake vendor, then each relay (the admin token in the configs of those watched)."""
    bench = Bench(procs, wrk.binary(True))
    vendor_port, control = services.free_port(), services.free_port()
    vendor = services.python_server(procs, "vendor", vendor_port, "--control-port", str(control))
    services.wait_port(vendor, control)
    services.wait_port(vendor, vendor_port)
    bench.vendor_control = f"http://{HOST}:{control}"
    for target in targets:
        (procs.workdir / target.key).mkdir()
        target.port = services.free_port()
        path = services.relay_config(procs.workdir / target.key, target.port, vendor_port)
        if target.viewers:
            config = yaml.safe_load(path.read_text())
            config["admin"] = {**config.get("admin", {}), "token": TOKEN}
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "relay", "serve", "--config", str(path)]
        proc = procs.start(f"relay-{target.key}", argv, env=code_env(target.code))
        services.wait_port(proc, target.port)
        target.pid = proc.popen.pid
        bench.urls[target.name] = target.url
    return bench


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(bench: Bench, target: Target, key: str, seconds: float,
                  counted: bool = True) -> None:
    """One wrk run against `target` and the delivery of what it accepted (C's viewer open
    again first if relay dropped it); counted unless a warm-up."""
    assert bench.session is not None
    reader = target.reader
    if reader is not None:
        await viewers(bench.session, target.url, 1)
    shown, drops = (reader.events["message"], reader.events["bye"]) if reader else (0, 0)
    tag = await bench.tag(key[0] if counted else "w", target.name)
    before = cpu_seconds(target.pid)
    run = await bench.load(target.name, SHAPES[key][0], tag, seconds, SHAPES[key][1])
    delivery = await scenarios.checked(bench, run)
    cpu = (cpu_seconds(target.pid) - before) / max(run.ok, 1) * 1e6
    target.accepted += run.accepted
    line = f"{target.key} {scenarios.describe(run, delivery)}  cpu {cpu:.0f} µs/req"
    if target.viewers:
        gauge = (await metrics(bench.session, target.url))["relay_tap_viewers"]
        target.gauge += [gauge] if counted else []
        line += f"  viewers {gauge:.0f}"
    if reader:
        line += f"  shown {reader.events['message'] - shown} dropped {reader.events['bye'] - drops}"
    say(line)
    if counted:
        target.values.setdefault(key, []).append(run.rps)
        target.cpu.setdefault(key, []).append(cpu)


async def load_all(bench: Bench, targets: list[Target], rounds: int, seconds: float) -> None:
    for key, (shape, connections) in SHAPES.items():
        say(f"\n== {key}: {shape.path}, {connections} connections, {rounds} x {seconds:.0f} s")
        for index in range(rounds):
            for turn in scenarios.rotation([t.key for t in targets], index):
                await measure(bench, next(t for t in targets if t.key == turn), key, seconds)


async def run(args: argparse.Namespace, procs: Procs, codes: tuple[Path, Path]) -> str:
    """C's viewer opens at the start; D's after the warm-up, which would drop them."""
    targets = [Target("A", "relay-base", f"relay at {args.base}", codes[0]),
               Target("B", RELAY, "relay, no viewer", codes[1]),
               Target("C", "relay-1view", "relay, 1 viewer reading", codes[1], viewers=1),
               Target("D", "relay-10slow", f"relay, {SLOW} viewers not reading", codes[1],
                      viewers=SLOW)]
    c, d = targets[2], targets[3]
    bench = await asyncio.to_thread(start, procs, targets)
    socks: list[socket.socket] = []
    async with aiohttp.ClientSession() as session:
        bench.session, c.reader = session, Reader()
        task = asyncio.create_task(c.reader.watch(session, c.url))
        try:
            for target in targets if not args.quick else ():
                for key in SHAPES:
                    await measure(bench, target, key, 1.0, counted=False)
            socks += await asyncio.to_thread(slow_viewers, d.port, SLOW)
            await viewers(session, d.url, SLOW)
            ports = {sock.getsockname()[1] for sock in socks}
            snapshot(targets, "before", ports)
            await load_all(bench, targets, args.rounds, args.seconds)
            snapshot(targets, "after", ports)
            for target in targets:
                queue = await metrics(session, target.url)
                if queue["relay_outbox_messages"] or queue["relay_dead_letters_total"]:
                    raise Undelivered(f"{target.key}'s queue is not empty at the end: {queue}")
        finally:
            task.cancel()
            for sock in socks:
                sock.close()
    return summary(targets)


def snapshot(targets: list[Target], moment: str, ports: set[int]) -> None:
    """Each relay's RSS (process tree); D's connections to the slow viewers."""
    targets[3].held[moment] = sockets(targets[3].port, ports)
    for target in targets:
        target.rss[moment] = services.tree_rss_kb(target.pid)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def shape_rows(targets: list[Target], key: str) -> list[str]:
    per = SHAPES[key][0].per_request
    lines = [f"**{key}**: {'requests/s' if per == 1 else 'messages/s'}, median of the rounds;"
             " ratio of the medians (of CPU per request), and of each round", "",
             "| target | median | rounds | ratio | per round | CPU µs/request |",
             "|---|---|---|---|---|---|"]
    for target in targets:
        values, versus = target.values.get(key, []), targets[0 if target.key == "B" else 1]
        ratio = per_round = ""
        if target.key != "A" and median(versus.values.get(key, [])):
            ratio = (f"{target.key}/{versus.key} {median(values) / median(versus.values[key]):.2f}x"
                     f" (CPU {median(target.cpu[key]) / median(versus.cpu[key]):.2f}x)")
            per_round = ", ".join(f"{a / b:.2f}" for a, b in
                                  zip(values, versus.values[key], strict=True))
        lines.append(f"| {target.key}: {target.label} | {median(values) * per:,.0f} |"
                     f" {', '.join(f'{v * per:,.0f}' for v in values)} | {ratio} | {per_round}"
                     f" | {median(target.cpu.get(key, [])):.0f} |")
    return [*lines, ""]


def summary(targets: list[Target]) -> str:
    lines = [*shape_rows(targets, "track"), *shape_rows(targets, "batch"),
             "| target | RSS before the counted runs (MB) | after (MB) | peak, VmHWM summed (MB) |",
             "|---|---|---|---|"]
    lines += [f"| {t.key} | {t.rss['before']['VmRSS'] / 1024:.1f} |"
              f" {t.rss['after']['VmRSS'] / 1024:.1f} | {t.rss['after']['VmHWM'] / 1024:.1f} |"
              for t in targets]
    c, d = targets[2], targets[3]
    assert c.reader is not None
    events, shares = c.reader.events, c.reader.shares
    lines += ["", f"- C's viewer: {c.reader.received / 1e6:.1f} MB, events {dict(events)};"
              f" {events['message']:,} messages shown of {c.accepted:,} accepted"
              f" ({100 * events['message'] / max(c.accepted, 1):.2f}%); {len(shares)}"
              f" `sampling` events, share {min(shares):g} to {max(shares):g}, median"
              f" {median(shares):g}; dropped by relay {events['bye']} times"
              + (f" ({c.reader.bye}), opened again each time" if events["bye"] else ""),
              f"- D's {SLOW} viewers (SO_RCVBUF {RCVBUF}): relay_tap_viewers after each of D's"
              f" runs {', '.join(f'{g:.0f}' for g in d.gauge)}; relay's connections to them"
              f" still open, and the bytes the kernel holds to send on them: {d.held['before']}"
              f" before the load, {d.held['after']} after"]
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="8d456f4", help="the commit before the tap")
    parser.add_argument("--rounds", type=int, help="rounds per shape (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, help="each wrk run (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke: 1 round of 1 s")
    args = parser.parse_args()
    args.rounds = max(args.rounds or (1 if args.quick else 3), 1)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    return args


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM too: the `finally` stops every process and the worktree


def main() -> int:
    args = arguments()
    signal.signal(signal.SIGTERM, interrupted)
    started, load_before = time.monotonic(), report.load()
    changed = git("status", "--short", "--", "relay").splitlines()
    code = git("rev-parse", "--short", "HEAD") + f", {len(changed)} paths under relay/ changed" \
        + "".join(f"; {line}" for line in changed if line.endswith(".py"))
    with tempfile.TemporaryDirectory(prefix="relay-bench-tap-") as tmp:
        procs = Procs(Path(tmp))
        try:
            text = asyncio.run(run(args, procs, code_trees(args.base, Path(tmp))))
        except (Undelivered, RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            procs.stop_all()
            with contextlib.suppress(subprocess.SubprocessError):
                git("worktree", "remove", "--force", str(Path(tmp) / "base"))
            git("worktree", "prune")
    say(f"\n- command: python bench/tap.py {' '.join(sys.argv[1:])}\n- date:"
        f" {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}, took"
        f" {time.monotonic() - started:.0f} s; load average (1 min) before and after:"
        f" {load_before}, {report.load()}\n- code: A {args.base}; B, C, D the working tree"
        f" ({code})\n- every message each relay answered 200 for reached the vendor\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
