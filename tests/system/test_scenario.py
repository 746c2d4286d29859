"""The B2B rules end to end: the vendor's "users belonging to multiple companies" warning fixed
through the real segment-analytics-python SDK and a running relay; restart, reload, `relay try`
and `relay report`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fakes import FakeUpstream, free_port
from processes import wait_ready
from segment.analytics.client import Client as SegmentClient

from relay.cli import commands
from relay.ops import queue

KEY = "WK_scenario"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
UPSTREAM = "seg"
WAIT = 10.0  # seconds any single wait may take before the test fails
SDK_OPTIONS: dict[str, Any] = {"upload_interval": 0.05, "max_retries": 0, "timeout": 5}
OWN = "our-co"
STAFF_DOMAIN = "staff.io"
B2B_RULES: list[dict[str, Any]] = [
    {"type": "one_group_per_user"},
    {"type": "drop_internal_users", "email_domains": [STAFF_DOMAIN], "own_groups": [OWN]},
]
OGPU, DIU = "one_group_per_user#0", "drop_internal_users#1"

Sent = dict[str, dict[str, Any]]  # a name of the test's choosing -> the message the SDK queued
Errors = list[tuple[Exception, list[dict[str, Any]]]]


# ---------------------------------------------------------------- helpers: SDK, delivery, files


@contextlib.asynccontextmanager
async def sdk(host: str, errors: Errors) -> AsyncIterator[SegmentClient]:
    """A segment-analytics-python client posting to `host`; upload errors land in `errors`."""
    client = SegmentClient(write_key=KEY, host=host,
                           on_error=lambda exc, batch: errors.append((exc, batch)),
                           **SDK_OPTIONS)
    try:
        yield client
    finally:
        await asyncio.to_thread(client.shutdown)


class Clock:
    """Event times one second apart, a few minutes ago, so 'the latest event wins' is
    unambiguous whichever batches the SDK happens to cut."""

    def __init__(self) -> None:
        self.next = datetime.now(UTC) - timedelta(minutes=5)

    def tick(self) -> datetime:
        self.next += timedelta(seconds=1)
        return self.next


def queued(call: tuple[bool, dict[str, Any]]) -> dict[str, Any]:
    """The message an SDK call queued (it must have been accepted into the queue)."""
    ok, message = call
    assert ok
    return dict(message)


def switch_companies(client: SegmentClient, clock: Clock) -> Sent:
    """Cause 1: a user in two companies (group acme, tracks, group globex, tracks)."""
    user = "u-multi"
    return {
        "join_acme": queued(client.group(user, "acme", {"name": "Acme"}, timestamp=clock.tick())),
        "acme_report": queued(client.track(user, "Report Viewed", timestamp=clock.tick())),
        "acme_share": queued(client.track(user, "Report Shared", timestamp=clock.tick())),
        "join_globex": queued(client.group(user, "globex", {"name": "Globex"},
                                           timestamp=clock.tick())),
        "globex_invoice": queued(client.track(user, "Invoice Sent", timestamp=clock.tick())),
        "explicit_acme": queued(client.track(user, "Report Exported", context={"groupId": "acme"},
                                             timestamp=clock.tick())),
    }


def staff_debugs_customer(client: SegmentClient, clock: Clock) -> Sent:
    """Cause 2: a staff member works in their own company, then joins customer acme to debug."""
    staff = "staff-1"
    return {
        "staff_join_own": queued(client.group(staff, OWN, {"name": "Our Co"},
                                              timestamp=clock.tick())),
        "staff_identify": queued(client.identify(staff, {"email": "Ann@Staff.IO"},
                                                 anonymous_id="anon-staff",
                                                 timestamp=clock.tick())),
        "staff_own_track": queued(client.track(staff, "Dashboard Viewed", timestamp=clock.tick())),
        "staff_join_acme": queued(client.group(staff, "acme", timestamp=clock.tick())),
        "staff_debug": queued(client.track(staff, "Report Viewed", timestamp=clock.tick())),
        "staff_debug_page": queued(client.page(staff, name="Billing", timestamp=clock.tick())),
        "staff_own_explicit": queued(client.track(staff, "Settings Opened",
                                                  context={"groupId": OWN},
                                                  timestamp=clock.tick())),
    }


# What the vendor must receive of switch_companies + staff_debugs_customer, in order:
# (name, the group call's groupId, context.groupId).
SCENARIO_DELIVERED = [
    ("join_acme", "acme", None),
    ("acme_report", None, "acme"),
    ("acme_share", None, "acme"),
    ("join_globex", "globex", None),
    ("globex_invoice", None, "globex"),
    ("explicit_acme", None, "acme"),
    ("staff_join_own", OWN, None),
    ("staff_identify", None, None),
    ("staff_own_track", None, OWN),
    ("staff_own_explicit", None, OWN),
]
# Messages in SCENARIO_DELIVERED whose context.groupId relay put there (the rest came with it).
SCENARIO_INJECTED = {"acme_report", "acme_share", "globex_invoice", "staff_own_track"}


async def run_scenario(relay_url: str) -> Sent:
    """Both causes of the warning sent through the SDK to relay; returns after relay stored all."""
    errors: Errors = []
    clock = Clock()
    async with sdk(relay_url, errors) as client:
        sent = {**switch_companies(client, clock), **staff_debugs_customer(client, clock)}
        await asyncio.to_thread(client.flush)
    assert errors == []
    return sent


async def until(check: Callable[[], Any], what: str, seconds: float = WAIT) -> Any:
    """Polls `check` (sync or async) until it returns something truthy; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.02)


async def delivered_in_process(running: Any, upstream: FakeUpstream,
                               count: int) -> list[dict[str, Any]]:
    """Every message the vendor accepted, once it has `count` and relay's outbox is empty."""
    await upstream.wait_for(count, seconds=WAIT)

    async def drained() -> bool:
        return await running.relay.outbox.backlog(UPSTREAM) == 0

    await until(drained, "relay's outbox drained")
    return upstream.accepted()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on relay's SQLite file, opened read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of relay's SQLite file (sqlite_sequence included)."""
    tables = [r[0] for r in rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: sorted(rows(db, f'SELECT * FROM "{t}"'), key=repr) for t in sorted(tables)}


def grouping(message: dict[str, Any]) -> tuple[Any, Any]:
    """A forwarded message's (groupId, context.groupId)."""
    return message.get("groupId"), (message.get("context") or {}).get("groupId")


def named(got: list[dict[str, Any]], sent: Sent) -> list[tuple[str, Any, Any]]:
    """The vendor's messages as (name, groupId, context.groupId), names looked up by messageId."""
    names = {m["messageId"]: name for name, m in sent.items()}
    return [(names.get(m["messageId"], m["messageId"]), *grouping(m)) for m in got]


def check_unchanged_but_group(got: list[dict[str, Any]], sent: Sent, injected: set[str]) -> None:
    """Apart from the context.groupId relay injected (only into `injected`), each message
    arrived as the SDK queued it (timestamp corrected and receivedAt added by relay)."""
    by_id = {m["messageId"]: (name, m) for name, m in sent.items()}
    for message in got:
        name, original = by_id[message["messageId"]]
        out = {k: v for k, v in message.items() if k not in ("timestamp", "receivedAt")}
        if name in injected:
            out["context"] = {k: v for k, v in out["context"].items() if k != "groupId"}
        assert out == {k: v for k, v in original.items() if k != "timestamp"}, name


# ------------------------------------------------------------------------- 1: the two causes


async def test_vendor_gets_one_group_per_track_and_no_staff_in_customer_accounts(
        upstream, write_config, start_relay):
    """Through the real SDK, every track the vendor receives carries the company current at its
    time, and a staff member's messages reach it only from their own company's group."""
    path = write_config([{"name": UPSTREAM, "kind": "segment", "url": upstream.url}],
                        rules=B2B_RULES)
    async with start_relay(path) as relay:
        sent = await run_scenario(relay.url)
        got = await delivered_in_process(relay, upstream, len(SCENARIO_DELIVERED))
    assert named(got, sent) == SCENARIO_DELIVERED
    check_unchanged_but_group(got, sent, SCENARIO_INJECTED)
    staff_in_acme = [m for m in got if m["userId"] == "staff-1" and "acme" in grouping(m)]
    assert staff_in_acme == []
    assert all(r.path == "/v1/batch" and r.status == 200 for r in upstream.requests)


# ------------------------------------------------------------------------------ 2: a restart


async def test_restart_keeps_groups_and_internal_users(upstream, write_config, start_relay):
    """After a restart on the same SQLite file, a user's ungrouped track gets the group
    remembered before it, and a staff member's linked anonymousId is still dropped."""
    path = write_config([{"name": UPSTREAM, "kind": "segment", "url": upstream.url}],
                        rules=B2B_RULES)
    errors: Errors = []
    clock = Clock()
    async with start_relay(path) as first, sdk(first.url, errors) as client:
        before = {**switch_companies(client, clock), **staff_debugs_customer(client, clock)}
        await asyncio.to_thread(client.flush)
        await delivered_in_process(first, upstream, len(SCENARIO_DELIVERED))
    assert len(upstream.accepted()) == len(SCENARIO_DELIVERED)

    async with start_relay(path) as second, sdk(second.url, errors) as client:
        after = {
            "multi_ungrouped": queued(client.track("u-multi", "After Restart")),
            "staff_anonymous": queued(client.track(anonymous_id="anon-staff",
                                                   event="Customer Report Viewed")),
            "staff_by_user": queued(client.track("staff-1", "Still Debugging")),
            "staff_anonymous_own": queued(client.track(anonymous_id="anon-staff",
                                                       event="Own Report Viewed",
                                                       context={"groupId": OWN})),
        }
        await asyncio.to_thread(client.flush)
        got = await delivered_in_process(second, upstream, len(SCENARIO_DELIVERED) + 2)
    assert errors == []
    sent = {**before, **after}
    assert named(got[len(SCENARIO_DELIVERED):], sent) == [
        ("multi_ungrouped", None, "globex"),
        ("staff_anonymous_own", None, OWN),
    ]
    check_unchanged_but_group(got, sent, {*SCENARIO_INJECTED, "multi_ungrouped"})


# ------------------------------------------------------------------------------- 3: reloads


async def test_rules_reload_when_the_file_changes(upstream, write_config, start_relay, caplog):
    """A rewritten config file is picked up while relay runs: the next messages follow the new
    rules, and the group remembered before the reload is still injected."""
    caplog.set_level(logging.INFO, logger="relay")
    path = write_config([{"name": UPSTREAM, "kind": "segment", "url": upstream.url}],
                        rules=[{"type": "one_group_per_user"}])
    errors: Errors = []
    async with start_relay(path) as relay, sdk(relay.url, errors) as client:
        sent = {
            "join": queued(client.group("u-r", "acme")),
            "old_signup": queued(client.track("u-r", "signed_up")),
            "old_debug": queued(client.track("u-r", "Debug Clicked")),
        }
        await asyncio.to_thread(client.flush)
        await delivered_in_process(relay, upstream, 3)

        data = yaml.safe_load(path.read_text())
        data["rules"] = [{"type": "one_group_per_user"},
                         {"type": "rename_event", "from": "signed_up", "to": "Signed Up"},
                         {"type": "drop", "when": {"type": "track", "event": "Debug *"}}]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        await until(lambda: "reload (file changed): 3 rule(s) in force" in caplog.messages,
                    "the reload's log line")

        sent |= {
            "new_signup": queued(client.track("u-r", "signed_up")),
            "new_debug": queued(client.track("u-r", "Debug Clicked")),
            "new_other": queued(client.track("u-r", "Report Viewed")),
        }
        await asyncio.to_thread(client.flush)
        got = await delivered_in_process(relay, upstream, 5)
    assert errors == []
    assert [(n, g, c, m.get("event")) for (n, g, c), m in zip(named(got, sent), got, strict=True)
            ] == [
        ("join", "acme", None, None),
        ("old_signup", None, "acme", "signed_up"),
        ("old_debug", None, "acme", "Debug Clicked"),
        ("new_signup", None, "acme", "Signed Up"),
        ("new_other", None, "acme", "Report Viewed"),
    ]


def clean_env() -> dict[str, str]:
    """The test's environment without anything that would change which config relay reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "SEGMENT_"))}
    env["RELAY_LOG_LEVEL"] = "INFO"
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def post_batch(url: str, batch: list[dict[str, Any]]) -> None:
    """Posts one /v1/batch as an SDK would; relay must answer 200 {"success": true}."""
    async with aiohttp.ClientSession() as http, http.post(
            url + "/v1/batch", json={"batch": batch}, headers=AUTH) as resp:
        assert (resp.status, await resp.json()) == (200, {"success": True})


def serve(path: Path, log: Path) -> subprocess.Popen[bytes]:
    """`python -m relay serve --config path` as a child process, its stdout and stderr in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=clean_env(), cwd=str(log.parent))


def read(log: Path) -> str:
    return log.read_text(errors="replace")


def rewrite_unnoticed(path: Path, data: dict[str, Any]) -> str:
    """Writes `data` as the config with the old size and mtime, so that relay's file watcher
    cannot see the change and only SIGHUP can load it; returns the text written."""
    before = path.stat()
    text = yaml.safe_dump(data, sort_keys=False)
    text += "#" + " " * (before.st_size - len(text.encode()) - 2) + "\n"
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return text


def track(message_id: str, user: str, event: str, **fields: Any) -> dict[str, Any]:
    """A track call as a batch item."""
    return {"type": "track", "messageId": message_id, "userId": user, "event": event, **fields}


async def test_sighup_reloads_rules_and_an_invalid_file_keeps_them(upstream, write_config,
                                                                   tmp_path):
    """In a `relay serve` process, SIGHUP swaps in the file's new rules with groups and internal
    users kept, and an invalid file keeps the running rules and logs `file:line: ...`."""
    port = free_port()
    path = write_config([{"name": UPSTREAM, "kind": "segment", "url": upstream.url}],
                        rules=B2B_RULES, listen=f"127.0.0.1:{port}")
    path.write_text(path.read_text() + "#" + " " * 400 + "\n")  # room for rewrite_unnoticed
    data = yaml.safe_load(path.read_text())
    db = Path(data["storage"]["path"])
    url, log = f"http://127.0.0.1:{port}", tmp_path / "relay.log"
    proc = serve(path, log)
    try:
        await wait_ready(proc.poll, url, lambda: read(log))

        async def delivered(count: int) -> list[dict[str, Any]]:
            await upstream.wait_for(count, seconds=WAIT)
            await until(lambda: rows(db, "SELECT count(*) FROM outbox") == [(0,)],
                        "relay's outbox drained")
            return upstream.accepted()

        async def reloaded(line: str, times: int = 1) -> None:
            await until(lambda: read(log).count(line) == times, f"log line {line!r}")

        await post_batch(url, [
            {"type": "group", "messageId": "g1", "userId": "u-h", "groupId": "acme"},
            track("t1", "u-h", "Signed Up"),
            {"type": "identify", "messageId": "i1", "userId": "staff-h",
             "traits": {"email": f"bob@{STAFF_DOMAIN}"}},
            track("t2", "staff-h", "Poked Around"),
        ])
        await delivered(2)

        data["rules"] = [*B2B_RULES, {"type": "rename_event", "from": "Signed Up",
                                      "to": "Account Created"}]
        rewrite_unnoticed(path, data)
        await asyncio.sleep(1.5)  # over one poll interval: the watcher has looked and seen nothing
        await post_batch(url, [track("t3", "u-h", "Signed Up")])
        await delivered(3)
        proc.send_signal(signal.SIGHUP)
        await reloaded("reload (SIGHUP): 3 rule(s) in force")
        await post_batch(url, [track("t4", "u-h", "Signed Up"),
                               track("t5", "staff-h", "Poked Around")])
        await delivered(4)

        data["rules"] = [*B2B_RULES, {"type": "rename_events", "from": "Signed Up",
                                      "to": "Signed Off"}]
        text = rewrite_unnoticed(path, data)
        line = text.splitlines().index("- type: rename_events") + 1
        proc.send_signal(signal.SIGHUP)
        await reloaded(f"ERROR reload: {path}:{line}: rules[2].type: unknown rule type"
                       " 'rename_events' (did you mean 'rename_event'?)")
        await reloaded("reload (SIGHUP): config has 1 error(s); the running rules stay")
        await post_batch(url, [track("t6", "u-h", "Signed Up"),
                               track("t7", "staff-h", "Poked Around")])
        got = await delivered(5)
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert [(m["messageId"], m.get("event"), *grouping(m)) for m in got] == [
        ("g1", None, "acme", None),
        ("t1", "Signed Up", None, "acme"),
        ("t3", "Signed Up", None, "acme"),
        ("t4", "Account Created", None, "acme"),
        ("t6", "Account Created", None, "acme"),
    ]
    assert read(log).count("reload (") == 2


# ------------------------------------------------------------------------------ 4: relay try

TRY_RULES = [*B2B_RULES, {"type": "rename_event", "from": "Report Viewed", "to": "Report Opened"}]


def blocks(output: str) -> list[tuple[str, list[str], Any]]:
    """`relay try` output as (header, rule and result lines, the final message or None)."""
    out = []
    for block in output.strip().split("\n\n"):
        head, *rest = block.splitlines()
        notes = [line for line in rest if not line.startswith("     ")]
        body = "\n".join(line[5:] for line in rest if line.startswith("     "))
        final = json.loads(body) if body else None
        if final is not None:
            assert isinstance(final.pop("receivedAt"), str)
            assert isinstance(final.pop("timestamp"), str)
        out.append((head, notes, final))
    return out


async def test_try_shows_each_rule_and_stores_nothing(upstream, write_config, start_relay,
                                                      tmp_path, capsys):
    """`relay try` names every rule that changed or dropped each message and prints the final
    message, and neither stores a message nor remembers a group or an internal user."""
    path = write_config([{"name": UPSTREAM, "kind": "segment", "url": upstream.url}],
                        rules=TRY_RULES)
    db = tmp_path / "relay.db"
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    async with start_relay(path) as relay:
        await post_batch(relay.url, [{"type": "group", "messageId": "r1", "userId": "u-try",
                                      "groupId": "acme", "timestamp": past}])
        await delivered_in_process(relay, upstream, 1)
    before = snapshot(db)
    assert before["outbox"] == []
    assert before["user_groups"] == [("u:u-try", "acme", before["user_groups"][0][2])]

    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"batch": [
        {"type": "group", "messageId": "y1", "userId": "u-try", "groupId": "globex"},
        track("y2", "u-try", "Report Viewed"),
        {"type": "identify", "messageId": "y3", "userId": "staff-9", "anonymousId": "anon-9",
         "traits": {"email": f"eve@{STAFF_DOMAIN}"}},
        {"type": "track", "messageId": "y4", "anonymousId": "anon-9", "event": "Report Viewed"},
        track("y5", "u-try", "Exported", context={"groupId": "acme"}),
    ]}))
    capsys.readouterr()
    assert await asyncio.to_thread(commands.main, ["try", "--config", str(path), str(payload)]) == 0
    output = capsys.readouterr()
    assert output.err == ""
    dropped = [f"  {DIU}: dropped (internal_user)", f"  => dropped by {DIU}: internal_user"]
    assert blocks(output.out) == [
        ("message 1 (group, messageId y1):", ["  => forwarded unchanged by the rules:"],
         {"type": "group", "messageId": "y1", "userId": "u-try", "groupId": "globex"}),
        ("message 2 (track, messageId y2):",
         [f'  {OGPU}: set context.groupId = "globex"',
          '  rename_event#2: event: "Report Viewed" -> "Report Opened"',
          "  => forwarded as:"],
         {"type": "track", "messageId": "y2", "userId": "u-try", "event": "Report Opened",
          "context": {"groupId": "globex"}}),
        ("message 3 (identify, messageId y3):", dropped, None),
        ("message 4 (track, messageId y4):", dropped, None),
        ("message 5 (track, messageId y5):", ["  => forwarded unchanged by the rules:"],
         {"type": "track", "messageId": "y5", "userId": "u-try", "event": "Exported",
          "context": {"groupId": "acme"}}),
    ]
    assert snapshot(db) == before

    async with start_relay(path) as relay:
        await post_batch(relay.url, [track("z1", "u-try", "Later"),
                                     track("z2", "staff-9", "Later"),
                                     {"type": "track", "messageId": "z3", "anonymousId": "anon-9",
                                      "event": "Later"}])
        got = await delivered_in_process(relay, upstream, 4)
    assert [(m["messageId"], *grouping(m)) for m in got] == [
        ("r1", "acme", None), ("z1", None, "acme"), ("z2", None, None), ("z3", None, None),
    ]
    assert rows(db, "SELECT ref FROM internal_users") == []


# --------------------------------------------------------------------------- 5: relay report


async def test_report_lists_multi_group_users_internal_users_and_rule_counts(
        upstream, write_config, start_relay, capsys):
    """After the scenario, `relay report` (text and --json) lists the users seen in two groups
    with their ungrouped track counts (internal users apart, as the vendor never sees them), the
    internal users, and each rule's changed/dropped."""
    path = write_config([{"name": UPSTREAM, "kind": "segment", "url": upstream.url}],
                        rules=B2B_RULES)
    started = time.time()
    async with start_relay(path) as relay:
        await run_scenario(relay.url)
        await delivered_in_process(relay, upstream, len(SCENARIO_DELIVERED))
    finished = time.time()

    capsys.readouterr()
    assert await asyncio.to_thread(commands.main, ["report", "--config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Rules (messages changed / dropped):",
        f"  {DIU}: 0 changed, 3 dropped",
        f"  {OGPU}: 6 changed, 0 dropped",
        "Users seen in more than one group: 1",
        "  userId u-multi: acme, globex (3 track calls came without a group)",
        "Internal users seen: 2 (delete them at the vendor)",
        "  anonymousId anon-staff (email_domain)",
        "  userId staff-1 (email_domain)",
    ]

    assert await asyncio.to_thread(commands.main, ["report", "--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    first_seen = [u.pop("first_seen") for u in report["internal_users"]]
    assert all(queue.iso(started) <= t <= queue.iso(finished) for t in first_seen)  # ISO text
    for user in report["multi_group_users"]:
        user["groups"].sort()
    assert report == {
        "counters": {f"changed.{OGPU}": 6, f"dropped.{DIU}": 3},
        "multi_group_users": [
            {"user": "u:u-multi", "groups": ["acme", "globex"], "tracks_without_group": 3},
        ],
        "internal_users": [
            {"user": "a:anon-staff", "reason": "email_domain"},
            {"user": "u:staff-1", "reason": "email_domain"},
        ],
    }

