"""What a run found, as text: the machine, versions, targets of issue 4, tables and a chart.

Every comparison is a ratio to a baseline measured in the same run. Two targets of issue 4 are
absolute (the p99 latency and the drain rate); they are judged as the issue states them, on
this machine, and shown beside the ratios. Nothing here sets the exit code: only undelivered
messages do.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.harness import NGINX, PARSE, RELAY
from bench.scenarios import Figure

MB = 150.0


@dataclass(frozen=True)
class Verdict:
    """One target of issue 4 and how this run did against it."""

    target: str
    measured: str
    passed: bool | None  # None: not measured in this run
    gap: str = ""


def machine() -> list[tuple[str, str]]:
    cpu = "unknown"
    memory = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return [("nproc", str(len(os.sched_getaffinity(0)))), ("CPU", cpu), ("memory", memory),
            ("system", f"{platform.system()} {platform.release()}")]


def busy_before(load_before: str) -> str:
    """What the load average before the run says about the machine."""
    try:
        busy = float(load_before) > BUSY_LOAD
    except ValueError:
        return "unknown"
    return ("something else was using the machine" if busy
            else f"nothing else was using the machine: at most {BUSY_LOAD}")


def load() -> str:
    """The 1-minute load average."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, all) CPU ticks of the machine since boot, from /proc/stat; None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is counted within user)
    return (fields[7], sum(fields[:8])) if len(fields) >= 8 else None


def stolen(before: tuple[int, int] | None) -> str:
    """The share of CPU time the host took from this virtual machine since `before`."""
    after = cpu_ticks()
    if before is None or after is None or after[1] <= before[1]:
        return "unknown"
    return f"{100 * (after[0] - before[0]) / (after[1] - before[1]):.1f}%"


def _tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def versions(nginx: str | None, wrk: str | None) -> list[tuple[str, str]]:
    out = [("Python", platform.python_version()), ("SQLite", sqlite3.sqlite_version)]
    for package in ("relay", "aiohttp", "aiosqlite", "uvloop", "orjson", "httptools"):
        try:
            out.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            if package in ("relay", "aiohttp", "aiosqlite"):
                out.append((package, "not installed"))
    out.append(("nginx", _tool_version([nginx, "-v"]) if nginx else "not installed"))
    out.append(("wrk", _tool_version([wrk, "-v"]) if wrk else "not installed (aiohttp generator)"))
    return out


def _ratio_target(figure: Figure | None, baseline: str, need: float, text: str) -> Verdict:
    ratio = figure.ratio(baseline) if figure else None
    if ratio is None:
        return Verdict(text, f"{baseline} not measured", None)
    gap = ("" if ratio >= need else
           f"short by {need / ratio:.1f}x (needs {need:.1f}x, is {ratio:.2f}x)")
    return Verdict(text, f"{ratio:.2f}x", ratio >= need, gap)


def targets(figures: dict[str, Figure]) -> list[Verdict]:
    """The targets of issue 4, point 4."""
    get = figures.get
    out = [
        _ratio_target(get("track"), PARSE, 0.8, "single-event requests/s >= 0.8x parse-only"),
        _ratio_target(get("track"), NGINX, 1.0, "single-event requests/s >= 1.0x nginx"),
        _ratio_target(get("batch"), PARSE, 0.3, "batch messages/s >= 0.3x parse-only"),
    ]
    lat = get("latency")
    if lat:
        p99 = lat.median(RELAY)
        base = lat.ratio(PARSE)
        extra = f" ({base:.1f}x parse-only's p99 at the same rate)" if base else ""
        out.append(Verdict("p99 at half of relay's maximum load <= 10 ms (absolute)",
                           f"{p99:.1f} ms{extra}", p99 <= 10.0,
                           "" if p99 <= 10 else f"over by {p99 / 10:.1f}x"))
    drain = get("backlog")
    if drain:
        rate = drain.median(RELAY)
        out.append(Verdict("backlog drain >= 50,000 messages/s (absolute)", f"{rate:,.0f} msg/s",
                           rate >= 50_000, "" if rate >= 50_000 else
                           f"short by {50_000 / rate:.1f}x" if rate else "nothing drained"))
        mem = drain.numbers
        # "The same": within the page caches SQLite fills on first use (2 MB a connection, four
        # connections); a queue held in memory would add hundreds of MB at a million messages.
        ok = mem["full"] <= MB and mem["full"] <= mem["empty"] + SQLITE_CACHES_MB
        out.append(Verdict(
            f"RSS <= {MB:.0f} MB with {mem['queued']:,.0f} waiting, the same as with none"
            f" (within {SQLITE_CACHES_MB} MB of SQLite's page caches)",
            f"{mem['full']:.1f} MB vs {mem['empty']:.1f} MB empty", ok,
            "" if ok else f"{mem['full'] - mem['empty']:+.1f} MB against the empty queue"))
    return out + _several_targets(figures)


def _several_targets(figures: dict[str, Figure]) -> list[Verdict]:
    """Issue 23's: the batch target reached with workers; Redis's cost to the event loop."""
    out = []
    workers = figures.get("workers")
    if workers:
        out.append(_ratio_target(workers, PARSE, 0.3, "batch messages/s >= 0.3x parse-only,"
                                 " with workers: 2 (and the redis backend)"))
    batch = figures.get("redis-batch")
    redis_main = batch.numbers.get("relay-redis main") if batch else None
    sqlite_main = batch.numbers.get("relay main") if batch else None
    if redis_main and sqlite_main:
        extra = redis_main / sqlite_main - 1
        out.append(Verdict("the redis backend's extra CPU per batch message in relay's event loop"
                           " <= 10% of the sqlite backend's", f"{redis_main:.1f} against"
                           f" {sqlite_main:.1f} µs ({extra:+.0%})", extra <= 0.10,
                           "" if extra <= 0.10 else f"{extra:+.0%}"))
    return out


SQLITE_CACHES_MB = 8


def _cell(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in values)


def relay_only_table(figure: Figure) -> list[str]:
    """A scenario only relay plays; the baselines' figures are from another scenario."""
    lines = [f"| target | median {figure.unit} | rounds | relay ÷ target |", "|---" * 4 + "|"]
    for target in [RELAY, *figure.baselines]:
        values = figure.relay if target == RELAY else figure.baselines[target]
        ratio = figure.ratio(target) if target != figure.name else None
        shown = f"**{ratio:.2f}x**" if ratio is not None else ""
        lines.append(f"| {target} | {_cell([figure.median(target)])} | {_cell(values)} |"
                     f" {shown} |")
    return [*lines, "", f"({figure.baseline_note}.)"]


def figure_table(figure: Figure) -> list[str]:
    if figure.baseline_note:
        return relay_only_table(figure) + _details(figure)
    head = f"| target | median {figure.unit} | rounds | p50 ms | p99 ms | non-200 | errors |"
    lines = [head + " relay ÷ target |", "|---" * 8 + "|"]
    for target in [figure.name, *figure.baselines]:
        runs = [r for r in figure.runs if r.target == target]
        values = figure.relay if target == figure.name else figure.baselines[target]
        p50 = f"{statistics.median(r.p50 for r in runs) * 1e3:.1f}" if runs else "-"
        p99 = f"{statistics.median(r.p99 for r in runs) * 1e3:.1f}" if runs else "-"
        bad = f"{sum(r.non200 for r in runs)}" if runs else "-"
        err = f"{sum(r.errors for r in runs)}" if runs else "-"
        ratio = figure.ratio(target) if target != figure.name else None
        shown = f"**{ratio:.2f}x**" if ratio is not None else ""
        lines.append(f"| {target} | {_cell([figure.median(target)])} | {_cell(values)} | {p50} |"
                     f" {p99} | {bad} | {err} | {shown} |")
    return lines + _details(figure)


def _details(figure: Figure) -> list[str]:
    if not figure.details:
        return []
    return ["", "| figure | value |", "|---|---|",
            *[f"| {label} | {value} |" for label, value in figure.details]]


# What the profiles show is in the way of the targets missed: kept by hand beside the harness,
# as it is a reading of py-spy output, not a figure the run can measure.
BUSY_LOAD = 0.5  # the 1-minute load average before a run above which others used the machine
PROFILE = Path(__file__).resolve().parent / "profile.md"
# The tap's cost, measured by bench/tap.py in a run of its own and kept beside the harness.
TAP = Path(__file__).resolve().parent / "tap-results.md"


def markdown(figures: dict[str, Figure], info: dict[str, list[tuple[str, str]]],
             notes: list[str], chart: str | None, quick: bool) -> str:
    lines = ["# relay benchmark results", ""]
    lines += [f"- {k}: {v}" for k, v in info["run"]]
    for section in ("machine", "versions", "setup"):
        lines += ["", f"## {section.capitalize()}", ""]
        lines += [f"- {k}: {v}" for k, v in info[section]]
    lines += ["", "## Targets of issue 4", ""]
    if quick:
        lines.append("Not judged: a --quick run checks correctness only.")
    else:
        lines += ["| target | measured | verdict |", "|---|---|---|"]
        for v in targets(figures):
            verdict = "n/a" if v.passed is None else "pass" if v.passed else f"FAIL: {v.gap}"
            lines.append(f"| {v.target} | {v.measured} | {verdict} |")
    if not quick and PROFILE.exists():
        lines += ["", PROFILE.read_text().strip()]
    if not quick and TAP.exists():
        lines += ["", TAP.read_text().strip()]
    if chart:
        lines += ["", f"![relay ÷ baselines]({chart})"]
    for figure in figures.values():
        lines += ["", f"## {figure.title}", "", *figure_table(figure)]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


LABELS = {"track": "single events\n(requests/s)",
          "batch": "100-message batches\n(messages/s)",
          "latency": "p99 at half\nof relay's maximum",
          "outage": "drain after an outage\n(÷ batch)",
          "backlog": "drain of the backlog\n(÷ batch)"}
# Issue 4's ratio targets, drawn as black ticks on their bars.
RATIO_TARGETS = {("track", PARSE): 0.8, ("track", NGINX): 1.0, ("batch", PARSE): 0.3}


def chart(figures: dict[str, Figure], baselines: list[str], path: Path) -> bool:
    """Bars of relay ÷ each baseline per scenario; False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 (optional: the bench extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        from matplotlib.ticker import FormatStrFormatter  # noqa: PLC0415
    except ImportError:
        return False
    speed = [f for f in figures.values() if f.higher_is_better]
    slow = [f for f in figures.values() if not f.higher_is_better]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [4, 1]})
    for ax, group, title in ((axes[0], speed, "throughput: relay ÷ baseline (higher is better;"
                              " black ticks: issue 4's targets)"),
                             (axes[1], slow, "p99 latency: relay ÷ baseline\n(lower is better)")):
        width = 0.8 / max(len(baselines), 1)
        for i, name in enumerate(baselines):
            ratios = [f.ratio(name) or 0.0 for f in group]
            xs = [x + (i - (len(baselines) - 1) / 2) * width for x in range(len(group))]
            bars = ax.bar(xs, ratios, width, label=f"÷ {name}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
            for x, f in zip(xs, group, strict=True):
                need = RATIO_TARGETS.get((f.key, name))
                if need:
                    ax.hlines(need, x - width / 2, x + width / 2, colors="black", linewidth=2)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(group)), [LABELS.get(f.key, f.key) for f in group], fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_formatter(FormatStrFormatter(""))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
