"""`relay queue`: stats, dead letters and purging, against a real database made by a real relay.

relay runs in-process (the `start_relay` fixture) or as a process, with the fake vendor; every
command runs as its own process (`python -m relay queue ...`), so it meets the running relay's
SQLite file across processes, as it does in production.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream, Reply, free_port

from relay.cli import commands
from relay.config import model as config
from relay.ops import queue, queue_db, replay
from relay.ops.progress import Bar

KEY = "wk-secret-4242"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
Message = dict[str, Any]


def env() -> dict[str, str]:
    """The test's environment without anything that would change which config relay reads."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "SEGMENT_"))}


async def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """`python -m relay queue ARGS` as a separate process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", *map(str, args), env=env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def track(message_id: str, user: str | None, event: str = "Clicked", **extra: Any) -> Message:
    message: Message = {"type": "track", "messageId": message_id, "event": event, **extra}
    if user is not None:
        message["userId"] = user
    return message


def tracks(user: str, count: int, tag: str | None = None) -> list[Message]:
    return [track(f"{tag or user}-{i}", user) for i in range(count)]


async def post(http: aiohttp.ClientSession, url: str, batch: list[Message]) -> int:
    """One SDK batch to relay; its answer status."""
    async with http.post(url + "/v1/batch", json={"batch": batch}, headers=AUTH) as resp:
        await resp.read()
        return resp.status


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows read straight from relay's SQLite file."""
    with sqlite3.connect(db, timeout=5) as conn:
        return conn.execute(sql, args).fetchall()


def ids_in(db: Path, table: str) -> list[tuple[str, str]]:
    """(upstream, messageId) of every row of `table`, sorted."""
    return sorted(query(db, f"SELECT upstream, json_extract(body, '$.messageId') FROM {table}"))


async def until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.05)


def seg(fake: FakeUpstream, name: str = "seg", kind: str = "segment") -> dict[str, Any]:
    return {"name": name, "kind": kind, "url": fake.url}


async def test_stats_match_what_is_queued_while_a_vendor_is_down(
        upstream, write_config, start_relay, tmp_path):
    """Stats show per upstream the queued messages, their bytes, the oldest age and dead letters."""
    other = FakeUpstream()
    await other.start()
    await upstream.stop()
    path = write_config([seg(upstream), seg(other, "jn", "june")])
    db = tmp_path / "relay.db"
    try:
        async with start_relay(path) as relay, aiohttp.ClientSession() as http:
            first_sent = time.time()
            assert await post(http, relay.url, tracks("ada", 5)) == 200
            first_stored = time.time()
            assert await post(http, relay.url, tracks("bob", 3)) == 200
            await other.wait_for(8)
            await until(lambda: query(db, "SELECT count(*) FROM outbox WHERE upstream = 'jn'")
                        == [(0,)], "jn delivered")
            await asyncio.sleep(1.0)
            asked = time.time()
            code, out, err = await run_cli("stats", "--json", "--config", path)
            code_text, text, err_text = await run_cli("stats", "--config", path)
            answered = time.time()
    finally:
        await other.stop()
    size = sum(len(body) for (body,) in query(db, "SELECT body FROM outbox"))
    assert (code, err, code_text, err_text) == (0, "", 0, "")
    seg_stats, jn_stats = json.loads(out)["upstreams"]
    age = seg_stats.pop("oldest_age_seconds")
    assert asked - first_stored - 0.001 <= age <= answered - first_sent + 0.001  # rounded to ms
    assert seg_stats == {"upstream": "seg", "messages": 8, "bytes": size, "dead_letters": 0,
                         "paused": None}
    assert jn_stats == {"upstream": "jn", "messages": 0, "bytes": 0, "oldest_age_seconds": 0.0,
                        "dead_letters": 0, "paused": None}
    header, seg_row, jn_row = [line.split() for line in text.splitlines()]
    assert header == ["UPSTREAM", "MESSAGES", "BYTES", "OLDEST", "DEAD", "LETTERS", "PAUSED"]
    shown_size = [f"{size / 1000:.1f}", "kB"] if size >= 1000 else [str(size), "B"]
    assert seg_row[:4] == ["seg", "8", *shown_size] and seg_row[5:] == ["0", "?"]
    assert re.fullmatch(r"[1-9][0-9]*s", seg_row[4])
    assert jn_row == ["jn", "0", "0", "B", "0s", "0", "?"]


async def test_stats_show_an_upstream_paused_by_the_running_relay(upstream, write_config, tmp_path):
    """With admin.token set, stats ask the running relay process which upstreams it paused."""
    port = free_port()
    upstream.default = Reply(401, '{"code":"unauthorized"}')
    path = write_config([seg(upstream)], listen=f"127.0.0.1:{port}",
                        admin={"token": "t" * 20})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(path), env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert await post(http, url, tracks("ada", 2)) == 200
                    break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "relay did not start"
                    await asyncio.sleep(0.05)
            await upstream.wait_for_requests(1)
            admin = {"Authorization": "Bearer " + "t" * 20}

            async def paused() -> bool:
                async with http.get(url + "/admin/queue", headers=admin) as resp:
                    return bool((await resp.json())["upstreams"][0]["paused"])

            while not await paused():  # relay's own word that it paused the upstream
                assert time.monotonic() < deadline, "relay never paused the upstream"
                await asyncio.sleep(0.05)
        code, out, err = await run_cli("stats", "--json", "--config", path)
    finally:
        proc.kill()
        await proc.wait()
    assert (code, err) == (0, "")
    (stats,) = json.loads(out)["upstreams"]
    assert stats.pop("oldest_age_seconds") > 0
    size = sum(len(body) for (body,) in query(tmp_path / "relay.db", "SELECT body FROM outbox"))
    assert stats == {"upstream": "seg", "messages": 2, "bytes": size, "dead_letters": 0,
                     "paused": True}


async def test_dead_letters_are_listed_shown_and_replayed_through_the_current_rules(
        upstream, write_config, start_relay, tmp_path):
    """Dead letters made by a refusing vendor are listed, shown, then replayed with new rules."""
    path = write_config([seg(upstream)])
    db = tmp_path / "relay.db"
    upstream.reject = {"poison-1", "poison-2"}
    sent = [*tracks("ada", 4), track("poison-1", "eve"), track("poison-2", "eve", "Dropped Later")]
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        assert await post(http, relay.url, sent) == 200
        await upstream.wait_for(4)
        await until(lambda: len(ids_in(db, "dead_letters")) == 2, "two dead letters")
        dead = query(db, "SELECT id, body, enqueued_at, failed_at FROM dead_letters ORDER BY id")

        code, out, err = await run_cli("dead", "list", "--json", "--config", path)
        assert (code, err) == (0, "")
        assert json.loads(out) == {"total": 2, "dead_letters": [
            {"id": row_id, "upstream": "seg", "write_key": "wk-s…", "user": "eve",
             "message_id": f"poison-{n}", "type": "track",
             "event": ["Clicked", "Dropped Later"][n - 1], "enqueued_at": queue.iso(enqueued),
             "failed_at": queue.iso(failed), "status": 400,
             "answer": '{"code":"invalid","message":"bad message"}', "message": None,
             "worker": 1}
            for n, (row_id, _, enqueued, failed) in enumerate(dead, 1)]}

        code, text, err = await run_cli("dead", "list", "--since", "1h", "--config", path)
        assert (code, err) == (0, "")
        assert [line.split()[:6] for line in text.splitlines()[1:]] == [
            [str(dead[0][0]), "seg", queue.iso(dead[0][3]), "400", "track", "Clicked"],
            [str(dead[1][0]), "seg", queue.iso(dead[1][3]), "400", "track", "Dropped"]]
        assert await run_cli("dead", "list", "--upstream", "other", "--config", path) == (
            1, "", "relay queue dead list: no dead letters of upstream other\n")
        code, out, _ = await run_cli("dead", "list", "--json", "--since", "2999-01-01T00:00:00Z",
                                     "--config", path)
        assert (code, json.loads(out)) == (1, {"total": 0, "dead_letters": []})

        code, shown, err = await run_cli("dead", "show", str(dead[0][0]), "--config", path)
        assert (code, err) == (0, "")
        head, message = shown.split("  message:\n")
        assert head.splitlines() == [
            f"dead letter {dead[0][0]}", "  upstream:    seg", "  write key:   wk-s…",
            "  user:        eve", f"  accepted at: {queue.iso(dead[0][2])}",
            f"  failed at:   {queue.iso(dead[0][3])} (answer 400)",
            '  answer:      {"code":"invalid","message":"bad message"}']
        assert json.loads(message) == json.loads(dead[0][1])
        assert await run_cli("dead", "show", "999999", "--config", path) == (
            1, "", "relay queue dead show: no dead letter 999999\n")
        assert KEY not in out + text + shown

        write_config([seg(upstream)], rules=[
            {"type": "set", "path": "context.app.name", "value": "replayed"},
            {"type": "drop", "id": "drop-later", "when": {"event": "Dropped Later"}}])
        upstream.reject = set()
        assert await run_cli("dead", "replay", "--config", path) == (0, (
            "replayed 2 of 2 dead letter(s) through the current rules: 1 back in the outbox"
            " (seg: 1), 1 dropped by the rules (drop-later: 1)\n"), "")
        accepted = await upstream.wait_for(5)
        await until(lambda: query(db, "SELECT count(*) FROM outbox") == [(0,)], "outbox empty")
        assert await run_cli("dead", "replay", "--config", path) == (
            1, "", "relay queue dead replay: no dead letters to replay\n")
    expected = json.loads(dead[0][1])
    expected["context"] = {**expected.get("context", {}), "app": {"name": "replayed"}}
    assert [m["messageId"] for m in accepted] == ["ada-0", "ada-1", "ada-2", "ada-3", "poison-1"]
    assert accepted[4] == expected
    assert ids_in(db, "dead_letters") == []
    assert query(db, "SELECT count FROM counters WHERE name = 'dropped.drop-later'") == [(1,)]


async def test_replay_leaves_dead_letters_of_upstreams_no_longer_configured(
        upstream, write_config, start_relay, tmp_path):
    """Dead letters of an upstream gone from the config stay; naming an unknown one is an error."""
    path = write_config([seg(upstream)])
    upstream.reject = {"poison-1"}
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        assert await post(http, relay.url, [track("poison-1", "eve")]) == 200
        await until(lambda: len(ids_in(tmp_path / "relay.db", "dead_letters")) == 1, "dead")
    renamed = config.load(str(write_config([seg(upstream, "seg2")])))
    replayed = await replay.dead_replay(renamed)
    assert (replayed.selected, replayed.unknown_upstreams) == (0, {"seg": 1})
    unknown = r"^upstream 'seg' is not in the config \(seg2\)$"
    with pytest.raises(queue_db.QueueError, match=unknown):
        await replay.dead_replay(renamed, upstream="seg")
    assert ids_in(tmp_path / "relay.db", "dead_letters") == [("seg", "poison-1")]


async def test_replay_stops_at_storage_max_bytes(upstream, write_config, start_relay, tmp_path):
    """A replay that would take the outbox past storage.max_bytes stops and keeps the rest."""
    path = write_config([seg(upstream)], storage={
        "path": str(tmp_path / "relay.db"), "synchronous": "normal", "max_bytes": 1_000_000})
    upstream.reject = {"poison-1"}
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        big = track("poison-1", "eve", properties={"pad": "p" * 31_000})
        assert await post(http, relay.url, [big]) == 200
        await until(lambda: len(ids_in(tmp_path / "relay.db", "dead_letters")) == 1, "dead")
        await upstream.stop()
        statuses = [await post(http, relay.url, [track(f"fill-{i}", "ada", properties={
            "pad": "f" * 30_000})]) for i in range(40)]
        assert statuses.count(503) > 0 and set(statuses) == {200, 503}
        code, out, err = await run_cli("dead", "replay", "--config", path)
    assert (code, out) == (1, "replayed 0 of 1 dead letter(s) through the current rules: 0 back"
                              " in the outbox, 0 dropped by the rules\n")
    assert err == ("relay queue dead replay: stopped, the outbox is at storage.max_bytes; the"
                   " rest stays in dead letters until the upstreams catch up\n")
    assert ids_in(tmp_path / "relay.db", "dead_letters") == [("seg", "poison-1")]


async def test_purge_removes_exactly_one_users_messages_while_relay_runs(
        upstream, write_config, start_relay, tmp_path):
    """Purge removes the user's waiting messages and dead letters by userId or anonymousId only."""
    path = write_config([seg(upstream), seg(upstream, "jn", "june")])
    db = tmp_path / "relay.db"
    upstream.reject = {"alice-dead", "bob-dead"}
    alice = [*tracks("alice", 3), *(track(f"anon-{i}", None, anonymousId="alice") for i in (1, 2)),
             {"type": "identify", "messageId": "linked", "userId": "dave", "anonymousId": "alice"}]
    others = [*(track(f"bob-{i}", "bob", anonymousId="bob-anon") for i in range(4)),
              track("alice2-0", "alice2"), track("seven", 7),
              track("friend", "carol", properties={"friend": "alice"})]
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        assert await post(http, relay.url, [track("alice-dead", "alice"),
                                            track("bob-dead", "bob")]) == 200
        await until(lambda: len(ids_in(db, "dead_letters")) == 4, "four dead letters")
        await upstream.stop()
        assert await post(http, relay.url, alice + others) == 200
        late: list[Message] = []
        stop = asyncio.Event()

        async def keep_sending() -> None:  # bob goes on using the app meanwhile
            while not stop.is_set():
                late.append(track(f"late-{len(late)}", "bob"))
                assert await post(http, relay.url, late[-1:]) == 200

        sender = asyncio.create_task(keep_sending())
        code, out, err = await run_cli("purge", "--user", "alice", "--config", path)
        stop.set()
        await sender
        assert len(late) > 10
        assert (code, err) == (0, "")
        assert out == ("purged user 'alice': 12 waiting message(s) (jn: 6, seg: 6), 2 dead"
                       " letter(s) (jn: 1, seg: 1)\n")
        kept = sorted(m["messageId"] for m in others + late)
        assert ids_in(db, "outbox") == sorted((u, m) for u in ("jn", "seg") for m in kept)
        assert ids_in(db, "dead_letters") == [("jn", "bob-dead"), ("seg", "bob-dead")]
        assert await run_cli("purge", "--user", "alice", "--config", path) == (
            1, "", "relay queue purge: nothing queued for user 'alice'\n")
        await upstream.start()
        accepted = await upstream.wait_for(2 * len(kept))
    assert sorted(m["messageId"] for m in accepted) == sorted([*kept, *kept])


async def test_long_work_shows_progress(upstream, write_config, start_relay, tmp_path):
    """Purging 3,000 messages writes a progress line per tenth to stderr (no terminal)."""
    path = write_config([seg(upstream)])
    await upstream.stop()
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        for chunk in range(6):
            assert await post(http, relay.url, tracks("bulk", 500, f"bulk{chunk}")) == 200
        assert await post(http, relay.url, tracks("keep", 5)) == 200
        code, out, err = await run_cli("purge", "--user", "bulk", "--config", path)
    assert (code, out) == (0, "purged user 'bulk': 3000 waiting message(s) (seg: 3000),"
                              " 0 dead letter(s)\n")
    lines = [re.fullmatch(r"purge: (\d+)/3000 \((\d+)%\), \d+/s", line)
             for line in err.splitlines()]
    assert all(lines), err
    assert [(int(m[1]), int(m[2])) for m in lines if m] == [
        (500, 16), (1000, 33), (1500, 50), (2000, 66), (2500, 83), (3000, 100)]
    assert ids_in(tmp_path / "relay.db", "outbox") == [("seg", f"keep-{i}") for i in range(5)]


def test_progress_bar_redraws_one_line_on_a_terminal():
    """On a terminal the bar is redrawn in place with \\r and ends with a newline when closed."""
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            bar = Bar("replay", stream=stream, min_total=10, interval=0.0, width=10)
            for done in (0, 500, 1000):
                bar(done, 1000)
            bar.close()
            Bar("small", stream=stream)(3, 5)  # under min_total: nothing
        shown = b""
        while select.select([master], [], [], 0.2)[0]:
            shown += os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)
    frames = shown.decode().replace("\x1b[K", "").split("\r")
    assert [re.sub(r" \d+/s", " N/s", frame) for frame in frames] == [
        "", "replay [----------] 0/1000   0% N/s", "replay [#####-----] 500/1000  50% N/s",
        "replay [##########] 1000/1000 100% N/s", "\n"]


def test_queue_commands_exit_codes(tmp_path, capsys):
    """A bad config exits 2, a missing database or an unknown dead letter exits 1, with a reason."""
    assert commands.main(["queue", "stats", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    good = tmp_path / "relay.yaml"
    good.write_text(f"storage: {{path: {tmp_path / 'absent.db'}}}\n"
                    "upstreams: [{name: seg, kind: segment, url: 'http://127.0.0.1:9'}]\n")
    for args in (["stats"], ["dead", "list"], ["dead", "show", "1"], ["dead", "replay"],
                 ["purge", "--user", "u"]):
        assert commands.main(["queue", *args, "--config", str(good)]) == 1
        assert capsys.readouterr() == ("", f"relay queue: no database at {tmp_path / 'absent.db'}:"
                                           " relay has not run with this storage.path\n")
    assert commands.main(["queue"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["queue", "dead", "list", "--since", "yesterday", "--config", str(good)])
    assert exit_info.value.code == 2
    assert "'yesterday' is neither an ISO-8601 time" in capsys.readouterr().err
