"""The `relay` command: parses arguments and calls into the package."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence

from relay import logs, server, workers
from relay.cli import queue as queue_commands
from relay.config import model as config
from relay.ingest.segment import PayloadError
from relay.ops import report, salvage, tap_client, try_rules, worker_files
from relay.outbox import lock
from relay.state.redis_store import FAILURES

EXIT_CONFIG = config.EXIT_INVALID


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one sub-command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    code: int = args.func(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="A gateway for Segment-protocol analytics: it accepts what the"
        " SDKs send, applies the rules of one YAML file, stores every message in SQLite and"
        " forwards it in batches to each vendor.")
    parser.add_argument("--version", action="version", version=f"relay {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    default = os.environ.get("RELAY_CONFIG", config.DEFAULT_PATH)
    commands = {}
    for name, func, text in (
        ("serve", _serve, "run relay: accept, store and forward messages"),
        ("check", _check, "validate a config file and exit"),
        ("try", _try, "show what the rules do to a payload; stores, sends and remembers nothing"),
        ("report", _report, "users in several groups, internal users seen, rule counts"),
        ("salvage", _salvage, "copy what is readable of a damaged database into a new file"),
        ("tap", _tap, "watch the running relay's messages live: what the rules did, delivery"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", default=default,
                         help=f"config file (default: $RELAY_CONFIG or {config.DEFAULT_PATH})")
        cmd.set_defaults(func=func)
        commands[name] = cmd
    commands["try"].add_argument("file", nargs="?", default="-",
                                 help="a payload as an SDK sends it (default: - for stdin)")
    commands["try"].add_argument("--route", help="the path it is sent to, e.g. /v1/t (default:"
                                 " /v1/batch for a batch, else /v1/<type>)")
    commands["report"].add_argument("--json", action="store_true", help="print JSON")
    commands["salvage"].add_argument("--to", required=True, metavar="NEW",
                                     help="the new database file to write (must not exist)")
    _tap_arguments(commands["tap"])
    log_format = os.environ.get("RELAY_LOG_FORMAT", "human")
    commands["serve"].add_argument(
        "--log-format", choices=("human", "json"),
        default=log_format if log_format in ("human", "json") else "human",
        help="log lines for people, or JSON lines (default: $RELAY_LOG_FORMAT or human)")
    queue_commands.add(sub, default)
    return parser


def _check(args: argparse.Namespace) -> int:
    loaded = config.load_or_print(args.config)
    if loaded is None:
        return EXIT_CONFIG
    _check_notes(loaded)
    print(f"{args.config}: ok ({len(loaded.upstreams)} upstream(s), {len(loaded.rules)} rule(s))")
    return 0


def _check_notes(loaded: config.Config) -> None:
    for note in loaded.warnings:
        print(note, file=sys.stderr)


def _try(args: argparse.Namespace) -> int:
    loaded = config.load_or_print(args.config)
    if loaded is None:
        return EXIT_CONFIG
    try:
        if args.file == "-":
            body = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as fh:
                body = fh.read()
        lines = asyncio.run(try_rules.run(loaded, body, args.route))
    except OSError as exc:
        print(f"relay try: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except PayloadError as exc:
        print(f"relay try: {exc.message}", file=sys.stderr)
        return 1
    print("\n".join(lines).rstrip())
    return 0


def _report(args: argparse.Namespace) -> int:
    loaded = config.load_or_print(args.config)
    if loaded is None:
        return EXIT_CONFIG
    try:
        built = asyncio.run(report.build(loaded))
    except FAILURES as exc:
        print(f"relay report: cannot read user state from Redis ({exc})", file=sys.stderr)
        return 1
    print(json.dumps(built, indent=2) if args.json else "\n".join(report.text(built)))
    return 0


def _tap_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--user", help="only this userId or anonymousId")
    cmd.add_argument("--type", help="only this type (track, identify, ...)")
    cmd.add_argument("--event", help="only event names matching this glob, e.g. 'Report *'")
    cmd.add_argument("--outcome", choices=("forwarded", "dropped", "invalid", "refused"))
    cmd.add_argument("--upstream", help="delivery events of this upstream only")
    cmd.add_argument("--json", action="store_true", help="JSON lines: {kind, ...event}")
    cmd.add_argument("--limit", type=int, metavar="N", help="stop after N messages")


def _tap(args: argparse.Namespace) -> int:
    loaded = config.load_or_print(args.config)
    if loaded is None:
        return EXIT_CONFIG
    if not loaded.admin.token:
        print(f"relay tap: admin.token is empty in {args.config}, so the tap is off",
              file=sys.stderr)
        return EXIT_CONFIG
    filters = {name: getattr(args, name) or "" for name in tap_client.FILTERS}
    # What is printed is cut and escaped already; a terminal that cannot show a character
    # gets its escape rather than a traceback.
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        return asyncio.run(_tapping(loaded, filters, args.json, args.limit))
    except KeyboardInterrupt:
        return 0
    except tap_client.TapError as exc:
        print(f"relay tap: {exc}", file=sys.stderr)
        return 1


async def _tapping(loaded: config.Config, filters: dict[str, str], as_json: bool,
                   limit: int | None) -> int:
    shown = 0
    async for kind, data in tap_client.events(loaded, filters):
        if kind == "bye":
            print(f"relay tap: relay ended the stream: {data.get('reason')}", file=sys.stderr)
            return 1
        text = json.dumps({"kind": kind, **data}) if as_json else tap_client.line(kind, data)
        if text is not None:
            print(text, flush=True)
        shown += kind == "message"
        if limit is not None and shown >= limit:
            return 0
    return 0


def _salvage(args: argparse.Namespace) -> int:
    loaded = config.load_or_print(args.config)
    if loaded is None:
        return EXIT_CONFIG
    try:
        copied = salvage.salvage(loaded.storage.path, args.to)
    except salvage.SalvageError as exc:
        print(f"relay salvage: {exc}", file=sys.stderr)
        return 1
    for table, rows in copied.items():
        print(f"{table}: {rows} row(s)")
    print(f"{loaded.storage.path} is unchanged. To run on what was saved: stop relay, move"
          f" {loaded.storage.path} aside (keep it), move {args.to} to {loaded.storage.path}.")
    return 0


def _serve(args: argparse.Namespace) -> int:
    loaded = config.load_or_print(args.config)
    if loaded is None:
        return EXIT_CONFIG
    # Until relay handles SIGHUP (server.serve), one would end it: a start reads the config anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = workers.worker_number()
    logs.configure(os.environ.get("RELAY_LOG_LEVEL", "INFO"), args.log_format, worker)
    try:  # before anything touches the files; a worker runs under its supervisor's lock
        held = lock.take(loaded.storage.path) if worker is None else None
    except lock.StorageInUse as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    if loaded.workers > 1 and worker is None:
        argv = ["serve", "--config", args.config, "--log-format", args.log_format]
        return workers.Supervisor(loaded, argv).run()
    if worker is not None:
        loaded = dataclasses.replace(loaded, worker=worker)
    else:
        worker_files.merge_leftovers(loaded)
    try:
        server.run(loaded)
    except sqlite3.DatabaseError as exc:
        print(f"relay: cannot open storage {loaded.database}: {exc}\n"
              "  Nothing was changed. Keep a copy of the file; then either copy what is still"
              f" readable into a new file (relay salvage --config {args.config} --to NEW.db) and"
              " move that into place, or move the file away to start with an empty queue.",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: cannot listen on {loaded.listen}: {exc}", file=sys.stderr)
        return 1
    finally:
        if held is not None:
            held.close()
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"
