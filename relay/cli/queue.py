"""The `relay queue` sub-commands: their arguments, and their output for people and machines."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections.abc import Callable

from relay.config import model as config
from relay.ops import progress, queue, queue_db, replay

EXIT_CONFIG = config.EXIT_INVALID


QueueCommand = Callable[[argparse.Namespace, config.Config], int]


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser], default: str) -> None:
    """`relay queue stats | dead list | dead show ID | dead replay | purge --user ID`."""
    text = "the queue: stats, dead letters, purging a user; also while relay runs"
    group = sub.add_parser("queue", help=text, description=text)
    group.set_defaults(func=lambda _: _usage(group))
    commands = group.add_subparsers(dest="queue_command", metavar="COMMAND")
    stats = _leaf(commands, "stats", _queue_stats, default, "per upstream: messages waiting,"
                  " bytes, the oldest one's age, dead letters, paused (asked from the running"
                  " relay when admin.token is set)")
    text = "messages an upstream refused for good"
    dead = commands.add_parser("dead", help=text, description=text)
    dead.set_defaults(func=lambda _: _usage(dead))
    dead_commands = dead.add_subparsers(dest="dead_command", metavar="COMMAND")
    listing = _leaf(dead_commands, "list", _dead_list, default, "dead letters, oldest first")
    show = _leaf(dead_commands, "show", _dead_show, default, "one dead letter with its message")
    replay = _leaf(dead_commands, "replay", _dead_replay, default, "run dead letters through the"
                   " current rules, back into the outbox of the upstream they died at")
    purge = _leaf(commands, "purge", _purge, default, "delete a user's waiting messages and"
                  " dead letters, for deletion requests")
    for cmd in (stats, listing):
        cmd.add_argument("--json", action="store_true", help="print JSON")
    for cmd in (listing, replay):
        cmd.add_argument("--upstream", metavar="U", help="only those of upstream U")
        cmd.add_argument("--since", metavar="T", type=_since, help="only those that failed at"
                         " or after T: an ISO-8601 time, or an age like 30m, 2h, 7d")
    listing.add_argument("--limit", type=_positive, default=100, help="at most N (default 100)",
                         metavar="N")
    show.add_argument("id", help="the dead letter's id (from dead list): ID, or WORKER:ID")
    purge.add_argument("--user", required=True, metavar="ID", help="the userId or anonymousId")


def _leaf(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
          func: Callable[[argparse.Namespace], int], default: str,
          about: str) -> argparse.ArgumentParser:
    cmd = parent.add_parser(name, help=about, description=about)
    cmd.add_argument("--config", default=default,
                     help=f"config file (default: $RELAY_CONFIG or {config.DEFAULT_PATH})")
    cmd.set_defaults(func=func)
    return cmd


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1, got {text!r}")
    return int(text)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_CONFIG


def _since(text: str) -> str:
    try:
        queue_db.parse_since(text)
    except queue_db.QueueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _queue_command(func: QueueCommand) -> Callable[[argparse.Namespace], int]:
    """Loads the config (exit 2 if bad); storage problems are exit 1 with one line."""

    def run(args: argparse.Namespace) -> int:
        loaded = config.load_or_print(args.config)
        if loaded is None:
            return EXIT_CONFIG
        try:
            return func(args, loaded)
        except queue_db.QueueError as exc:
            print(f"relay queue: {exc}", file=sys.stderr)
        except sqlite3.Error as exc:
            print(f"relay queue: storage {loaded.storage.path}: {exc}", file=sys.stderr)
        return 1

    return run


@_queue_command
def _queue_stats(args: argparse.Namespace, loaded: config.Config) -> int:
    queues = asyncio.run(queue.stats(loaded))
    paused = asyncio.run(queue.paused(loaded))
    held = asyncio.run(queue.held(loaded))
    rows = [{**q.as_dict(), "paused": None if paused is None else paused.get(q.upstream, False)}
            for q in queues]
    if args.json:
        print(json.dumps({"upstreams": rows, "held": held}, indent=2))
        return 0
    configured = {u.name for u in loaded.upstreams}
    print("\n".join(_table(
        ["UPSTREAM", "MESSAGES", "BYTES", "OLDEST", "DEAD LETTERS", "PAUSED"],
        [[r["upstream"], str(r["messages"]), _size(r["bytes"]), _age(r["oldest_age_seconds"]),
          str(r["dead_letters"]), {True: "yes", False: "no", None: "?"}[r["paused"]]
          + ("" if r["upstream"] in configured else "  (not in the config)")] for r in rows])))
    if held or loaded.state.on_unavailable == "hold":
        print(f"held until Redis answers, rules still to run: {held}")
    return 0


@_queue_command
def _dead_list(args: argparse.Namespace, loaded: config.Config) -> int:
    found = asyncio.run(queue.dead_list(loaded, args.upstream, args.since, args.limit))
    if args.json:
        print(json.dumps({"total": found.total,
                          "dead_letters": [d.as_dict() for d in found.letters]}, indent=2))
    elif found.letters:
        print("\n".join(_table(
            ["ID", "UPSTREAM", "FAILED AT", "STATUS", "TYPE", "EVENT", "MESSAGE ID", "USER",
             "ANSWER"],
            [[d.label, d.upstream, d.failed_at, str(d.status), d.type or "-", d.event or "-",
              d.message_id or "-", d.user or "-", d.answer] for d in found.letters])))
        if found.total > len(found.letters):
            print(f"({len(found.letters)} of {found.total} shown; see --limit)")
    else:
        print("relay queue dead list: no dead letters" + _filters(args), file=sys.stderr)
    return 0 if found.total else 1


@_queue_command
def _dead_show(args: argparse.Namespace, loaded: config.Config) -> int:
    letter = asyncio.run(queue.dead_show(loaded, args.id))
    if letter is None:
        print(f"relay queue dead show: no dead letter {args.id}", file=sys.stderr)
        return 1
    print("\n".join([
        f"dead letter {letter.label}",
        f"  upstream:    {_short(letter.upstream, 500)}",
        f"  write key:   {letter.write_key}",
        f"  user:        {_short(letter.user, 500) or '-'}",
        f"  accepted at: {letter.enqueued_at}",
        f"  failed at:   {letter.failed_at} (answer {letter.status})",
        f"  answer:      {_short(letter.answer, 500)}",
        "  message:",
        *("    " + line for line in json.dumps(letter.message, indent=2).splitlines()),
    ]))
    return 0


@_queue_command
def _dead_replay(args: argparse.Namespace, loaded: config.Config) -> int:
    bar = progress.Bar("replay")
    try:
        done = asyncio.run(replay.dead_replay(loaded, args.upstream, args.since, bar))
    finally:
        bar.close()
    for name, count in done.unknown_upstreams.items():
        print(f"left {count} dead letter(s) of upstream {_short(name)}: not in the config",
              file=sys.stderr)
    if not done.selected:
        print("relay queue dead replay: no dead letters to replay" + _filters(args),
              file=sys.stderr)
        return 1
    requeued, dropped = sum(done.requeued.values()), sum(done.dropped.values())
    print(f"replayed {requeued + dropped} of {done.selected} dead letter(s) through the current"
          f" rules: {requeued} back in the outbox{_per(done.requeued)}, {dropped} dropped by"
          f" the rules{_per(done.dropped)}")
    if done.unreadable:
        print(f"left {done.unreadable} dead letter(s) whose message is not JSON", file=sys.stderr)
    if done.full:
        print("relay queue dead replay: stopped, the outbox is at storage.max_bytes; the rest"
              " stays in dead letters until the upstreams catch up", file=sys.stderr)
        return 1
    return 0


@_queue_command
def _purge(args: argparse.Namespace, loaded: config.Config) -> int:
    bar = progress.Bar("purge")
    try:
        done = asyncio.run(queue.purge_user(loaded, args.user, bar))
    finally:
        bar.close()
    messages, dead = sum(done.messages.values()), sum(done.dead_letters.values())
    if not messages + dead:
        print(f"relay queue purge: nothing queued for user {args.user!r}", file=sys.stderr)
        return 1
    print(f"purged user {args.user!r}: {messages} waiting message(s){_per(done.messages)},"
          f" {dead} dead letter(s){_per(done.dead_letters)}")
    return 0


def _filters(args: argparse.Namespace) -> str:
    parts = [f"of upstream {args.upstream}" if args.upstream else "",
             f"since {args.since}" if args.since else ""]
    return "".join(" " + p for p in parts if p)


def _per(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{k}: {n}' for k, n in sorted(counts.items()))})" if counts else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    rows = [[_short(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def _short(text: str, limit: int = 60) -> str:
    """`text` on one line, at most `limit` characters, control characters (from SDKs, vendors)
    shown as `?` so that they cannot break the table or drive the terminal."""
    line = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _age(seconds: float) -> str:
    whole = int(seconds)
    for big, big_unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"),
                                             (60, "m", 1, "s")):
        if whole >= big:
            return f"{whole // big}{big_unit}{whole % big // small}{small_unit}"
    return f"{whole}s"
