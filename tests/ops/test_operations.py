"""Operations: Prometheus metrics, log lines, the outbox cap, a really full disk, admin endpoints.

Everything runs for real: relay (in-process or as a `python -m relay serve` child) on 127.0.0.1,
the fake vendor of fakes.py, SQLite files on disk, and for the full disk a small tmpfs.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import pytest
from fakes import FakeUpstream, Reply, free_port
from processes import wait_ready
from prometheus_client.parser import text_string_to_metric_families

from relay.outbox.capacity import Capacity
from relay.outbox.store import SCHEMA as OUTBOX_SCHEMA

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

CAP = 1_000_000
PAD = 10_000  # characters of padding per filler message: about 10 kB stored each
READY_SECONDS = 10.0
Labels = tuple[tuple[str, str], ...]


def basic(key: str) -> dict[str, str]:
    """The Authorization header the SDKs send for `key`."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str], str]:
    """POSTs `body` (JSON, or raw bytes); returns status, decoded JSON, headers and raw text."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers=headers or {}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text), dict(resp.headers), text


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    async with http.get(url, headers=headers or {}) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def until(
    check: Callable[[], Any | Awaitable[Any]], seconds: float, what: str
) -> None:
    """Polls `check` every 50 ms until it is true; fails naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.05)


def filler(message_id: str) -> dict[str, Any]:
    """A track call of about 10 kB stored."""
    return {"type": "track", "messageId": message_id, "userId": "filler", "event": "Fill",
            "properties": {"pad": "x" * PAD}}


def sql(db: Path | str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of one read-only query on relay's database (a connection of its own)."""
    conn = sqlite3.connect(db, timeout=5.0)
    try:
        return list(conn.execute(query, args).fetchall())
    finally:
        conn.close()


def outbox_ids(db: Path | str, upstream: str | None = None) -> list[str]:
    """The messageIds waiting in the outbox, oldest first."""
    where, args = ("WHERE upstream = ?", (upstream,)) if upstream else ("", ())
    rows = sql(db, f"SELECT body FROM outbox {where} ORDER BY id", *args)
    return [json.loads(body)["messageId"] for (body,) in rows]


def outbox_bytes(db: Path | str, upstream: str | None = None) -> int:
    where, args = ("WHERE upstream = ?", (upstream,)) if upstream else ("", ())
    return int(sql(db, f"SELECT coalesce(sum(length(body)), 0) FROM outbox {where}", *args)[0][0])


def counters(db: Path | str) -> dict[str, int]:
    return dict(sql(db, "SELECT name, count FROM counters"))


def scrape(text: str) -> dict[str, dict[Labels, float]]:
    """Prometheus text as {sample name: {sorted label pairs: value}}."""
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def by(samples: dict[str, dict[Labels, float]], name: str, *keys: str) -> dict[Any, float]:
    """One sample name's values keyed by the given labels' values (a tuple if several)."""
    out: dict[Any, float] = {}
    for labels, value in samples.get(name, {}).items():
        found = dict(labels)
        values = tuple(found[k] for k in keys)
        out[values[0] if len(values) == 1 else values] = value
    return out


async def metrics_of(http: aiohttp.ClientSession, url: str) -> dict[str, dict[Labels, float]]:
    status, text, headers = await get(http, url + "/metrics")
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/plain"), headers
    return scrape(text)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test's own requests."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        yield session


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would change relay's config or log format."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "SEGMENT_"))}
    env["RELAY_LOG_LEVEL"] = "INFO"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class RelayProcess:
    """`python -m relay serve --config PATH [args]` as a child; stdout and stderr in files."""

    def __init__(self, config_path: Path, port: int, workdir: Path, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.args = args
        self.env = env if env is not None else clean_env()
        self.stdout = workdir / f"relay-{port}.stdout"
        self.stderr = workdir / f"relay-{port}.stderr"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config_path),
                 *self.args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env,
                cwd=str(self.workdir),
            )

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def out(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_ready(self, seconds: float = READY_SECONDS) -> None:
        """Polls /readyz until 200; fails with the log when the child exits or never is."""
        assert self.proc is not None
        await wait_ready(self.proc.poll, self.url, self.log, seconds)

    async def stop(self, seconds: float = 8.0) -> int | None:
        """SIGTERM, then the exit status (None if it is still running after `seconds`)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while (code := self.proc.poll()) is None:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)
        return code

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    """Every RelayProcess a test appends here is killed at teardown, whatever happened."""
    made: list[RelayProcess] = []
    yield made
    for process in made:
        process.kill()


# ---------------------------------------------------------------------------------------------
# 1. Metrics
# ---------------------------------------------------------------------------------------------


async def test_metrics_count_real_traffic_exactly(upstream, write_config, start_relay, http):
    """GET /metrics is Prometheus text whose every relay series counts the traffic exactly."""
    held = FakeUpstream()  # a vendor that is down: never started, so its port refuses
    key = "WK-metrics-1234"
    path = write_config(
        [{"name": "seg", "kind": "segment", "url": upstream.url},
         # One failed try, then a wait of 15 to 30 s: its messages stay put while the test runs.
         {"name": "held", "kind": "segment", "url": held.url,
          "backoff_initial_seconds": 30, "backoff_max_seconds": 60}],
        write_keys=[key],
        rules=[{"type": "drop", "id": "debug", "when": {"type": "track", "event": "Debug *"}},
               {"type": "set", "id": "app", "path": "context.app.name", "value": "web"}],
    )
    upstream.script.extend([Reply(500, '{"error":"boom"}'), Reply(500, '{"error":"boom"}')])
    upstream.reject = {"m-poison"}
    batch = [
        {"type": "track", "messageId": "m-a", "userId": "u1", "event": "Signed Up"},
        {"type": "track", "messageId": "m-poison", "userId": "u1", "event": "Signed Up"},
        {"type": "track", "messageId": "m-debug", "userId": "u1", "event": "Debug click"},
        {"type": "track", "messageId": "m-noevent", "userId": "u1"},
        {"type": "identify", "messageId": "m-b", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "track", "messageId": "m-c", "userId": "u1", "event": "Order Completed"},
    ]
    async with start_relay(path) as running:
        db = running.config.storage.path
        # One request, one commit: seg gets the four kept messages as one batch:
        # 500, 500, then 400 -> [a, poison] 400 -> [a] 200, [poison] 400 (dead), then [b, c] 200.
        status, _, _, _ = await post(http, running.url + "/v1/batch", {"batch": batch},
                                     basic(key))
        assert status == 200
        await upstream.wait_for(3)
        status, answer, _, _ = await post(http, running.url + "/v1/track",
                                          {"userId": "u1", "event": "E"}, basic("WRONG-key-99"))
        assert (status, answer["code"]) == (401, "invalid_write_key")
        status, answer, _, _ = await post(http, running.url + "/v1/track", b"{not json",
                                          basic(key))
        assert (status, answer["code"]) == (400, "invalid_json")
        status, _, _, _ = await post(http, running.url + "/v1/identify",
                                     {"userId": "u2", "messageId": "m-e"}, basic(key))
        assert status == 200
        await upstream.wait_for(4)
        await until(lambda: outbox_ids(db, "seg") == [], 5.0, "seg's outbox empty")
        await until(lambda: sql(db, "SELECT count(*) FROM dead_letters")[0][0] == 1, 5.0,
                    "the poison message dead-lettered")
        await asyncio.sleep(0.1)  # the oldest waiting message is measurably old

        m = await metrics_of(http, running.url)
        held_ids = outbox_ids(db, "held")
        held_bytes = outbox_bytes(db, "held")

    assert upstream.accepted_ids() == ["m-a", "m-b", "m-c", "m-e"]
    assert [r.status for r in upstream.requests] == [500, 500, 400, 400, 200, 400, 200, 200]
    assert held_ids == ["m-a", "m-poison", "m-b", "m-c", "m-e"]

    assert by(m, "relay_requests_total", "route", "status") == {
        ("/v1/batch", "200"): 1, ("/v1/track", "401"): 1, ("/v1/track", "400"): 1,
        ("/v1/identify", "200"): 1,
    }
    assert by(m, "relay_messages_received_total", "type") == {"track": 4, "identify": 2}
    assert by(m, "relay_messages_dropped_total", "rule", "reason") == {
        ("debug", "matched"): 1, ("protocol", "track_without_event"): 1,
    }
    assert by(m, "relay_messages_changed_total", "rule") == {"app": 5}
    assert by(m, "relay_outbox_messages", "upstream") == {"seg": 0, "held": 5}
    assert by(m, "relay_outbox_bytes", "upstream") == {"seg": 0, "held": held_bytes}
    assert held_bytes > 5 * 50
    ages = by(m, "relay_outbox_oldest_age_seconds", "upstream")
    assert set(ages) == {"seg", "held"}
    assert ages["seg"] == 0
    assert 0.1 <= ages["held"] < 30
    assert by(m, "relay_deliveries_total", "upstream", "status") == {
        ("seg", "500"): 2, ("seg", "400"): 3, ("seg", "200"): 3, ("held", "error"): 1,
    }
    assert by(m, "relay_delivery_retries_total", "upstream") == {"seg": 2, "held": 1}
    assert by(m, "relay_dead_letters_total", "upstream") == {"seg": 1}
    # Batches sent: seg 4, 4, 4, 2, 1, 1, 2, 1 and held's one try of 4.
    assert m["relay_batch_messages_count"] == {(): 9}
    assert m["relay_batch_messages_sum"] == {(): 23}
    assert m["relay_ingest_seconds_count"] == {(): 4}
    assert 0 < m["relay_ingest_seconds_sum"][()] < 10


# ---------------------------------------------------------------------------------------------
# 2. Logs
# ---------------------------------------------------------------------------------------------

UPSTREAM_KEY = "SECRET-KEY-1234567890"
INBOUND_KEY = "INBOUND-KEY-0987654321"
ADMIN_TOKEN = "ADMIN-TOKEN-0123456789abcdef"
HASH_KEY = "HASH-KEY-fedcba9876543210"
HASHED_EMAIL = "secret.person@example.com"
SECRETS = (UPSTREAM_KEY, INBOUND_KEY, ADMIN_TOKEN, HASH_KEY, HASHED_EMAIL)
JSON_KEYS = {"time", "level", "logger", "message"}
HUMAN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) \S.*")


def leaks(text: str) -> list[str]:
    """The secrets that appear in `text`."""
    return [s for s in SECRETS if s in text]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object with exactly time, level, logger and message."""
    lines = text.splitlines()
    assert lines, "no log lines at all"
    out = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert set(entry) == JSON_KEYS, line
        assert entry["level"] in ("info", "warning", "error"), line
        assert entry["logger"] == "relay" or entry["logger"].startswith("relay."), line
        assert isinstance(entry["message"], str) and "\n" not in entry["message"], line
        stamp = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
        assert stamp.tzinfo is not None, line
        out.append(entry)
    return out


async def log_scenario(relay: RelayProcess, upstream: FakeUpstream,
                       http: aiohttp.ClientSession) -> list[str]:
    """Drives relay through a failure, a recovery, a dead letter, a reload, admin calls and
    refused requests, then stops it; returns the text of every answer it gave."""
    upstream.script.append(Reply(500, '{"error":"boom"}'))
    upstream.reject = {"log-poison"}
    relay.start()
    await relay.wait_ready()
    batch = [
        {"type": "identify", "messageId": "log-ok", "userId": "u1",
         "traits": {"email": HASHED_EMAIL}},
        {"type": "track", "messageId": "log-poison", "userId": "u1", "event": "Bad"},
        {"type": "track", "messageId": "log-noevent", "userId": "u1"},
    ]
    status, _, _, text = await post(http, relay.url + "/v1/batch", {"batch": batch},
                                    basic(INBOUND_KEY))
    assert status == 200
    answers = [text]
    got = await upstream.wait_for(1)
    assert [m["messageId"] for m in got] == ["log-ok"]
    assert got[0]["traits"]["email"] != HASHED_EMAIL
    await until(lambda: "dead-lettered" in relay.log(), 5.0, "the dead-letter line")
    relay.signal(signal.SIGHUP)
    await until(lambda: "reload (SIGHUP)" in relay.log(), 5.0, "the reload line")
    for route in ("/admin/queue", "/admin/report"):
        status, text, _ = await get(http, relay.url + route, bearer(ADMIN_TOKEN))
        assert status == 200, text
        answers.append(text)
        status, text, _ = await get(http, relay.url + route, bearer(ADMIN_TOKEN[:-1] + "X"))
        assert status == 401, text
        answers.append(text)
    status, _, _, text = await post(http, relay.url + "/v1/track", {"userId": "u", "event": "E"},
                                    basic(INBOUND_KEY[:-1] + "X"))
    assert status == 401
    answers.append(text)
    status, _, _, text = await post(http, relay.url + "/v1/track", b"{", basic(INBOUND_KEY))
    assert status == 400
    answers.append(text)
    assert await relay.stop() == 0, relay.log()
    return answers


def only(entries: list[dict[str, Any]], pattern: str) -> dict[str, Any]:
    """The one log entry whose message matches `pattern` in full."""
    found = [e for e in entries if re.fullmatch(pattern, e["message"])]
    assert len(found) == 1, (pattern, [e["message"] for e in entries])
    return found[0]


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_json_logs_tell_each_event_and_never_a_secret(
        how, upstream, write_config, processes, http):
    """With --log-format json or RELAY_LOG_FORMAT=json every stderr line is a JSON object, the
    start, failure, recovery, dead letter and reload each have a line, and no secret shows."""
    port = free_port()
    path = write_config(
        [{"name": "seg", "kind": "segment", "url": upstream.url, "write_key": UPSTREAM_KEY}],
        listen=f"127.0.0.1:{port}", write_keys=[INBOUND_KEY], admin={"token": ADMIN_TOKEN},
        rules=[{"type": "hash", "paths": ["traits.email"], "key_env": "RELAY_HASH_KEY"}],
    )
    args: tuple[str, ...] = ("--log-format", "json") if how == "flag" else ()
    env = clean_env(RELAY_HASH_KEY=HASH_KEY, **({"RELAY_LOG_FORMAT": "json"} if how == "env"
                                                 else {}))
    relay = RelayProcess(path, port, path.parent, args, env)
    processes.append(relay)
    answers = await log_scenario(relay, upstream, http)

    text = relay.log()
    assert leaks(text) == [], text
    assert [leaks(a) for a in answers] == [[]] * len(answers), answers
    assert relay.out() == ""
    entries = json_lines(text)
    messages = [e["message"] for e in entries]
    assert entries[0] == {
        **entries[0], "level": "info", "logger": "relay",
        "message": f"relay: listening on 127.0.0.1:{port}; storage {path.parent / 'relay.db'};"
                   f" write keys INBO…; 1 rule(s); upstreams: seg (segment {upstream.url},"
                   " key SECR…)",
    }
    failed = only(entries, r'upstream seg: batch of 2 failed \(500 \{"error":"boom"\}\),'
                           r" attempt 1; messages kept, next try in \d+\.\ds")
    assert (failed["level"], failed["logger"]) == ("warning", "relay.forwarder")
    again = only(entries, r"upstream seg: delivering again")
    assert (again["level"], again["logger"]) == ("info", "relay.forwarder")  # a recovery
    dead = only(entries, r'upstream seg: 1 message\(s\) dead-lettered, answer 400:'
                         r' \{"code":"invalid","message":"bad message"\}')
    assert (dead["level"], dead["logger"]) == ("error", "relay.forwarder")
    reload = only(entries, r"reload \(SIGHUP\): 1 rule\(s\) in force")
    assert (reload["level"], reload["logger"]) == ("info", "relay.reload")
    dropped = only(entries, r"ingest: from key INBO…, not forwarded as the vendor would drop"
                            r" them: track_without_event=1")
    assert (dropped["level"], dropped["logger"]) == ("info", "relay.ingest")
    assert messages.index(failed["message"]) < messages.index(again["message"])
    assert messages[-1] == "relay: stopping; 0 request(s) in flight"


async def test_human_logs_are_one_plain_line_per_event(
        upstream, write_config, processes, http, tmp_path):
    """Without a format option the log is one human line per event (a multi-line vendor answer
    included), none of them JSON."""
    port = free_port()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url,
                          "write_key": UPSTREAM_KEY}], listen=f"127.0.0.1:{port}")
    upstream.reject = {"h-poison"}
    upstream.reject_reply = Reply(400, '{"code": "invalid",\n "message": "bad\n message"}')
    relay = RelayProcess(path, port, tmp_path)
    processes.append(relay)
    relay.start()
    await relay.wait_ready()
    status, _, _, _ = await post(http, relay.url + "/v1/track",
                                 {"userId": "u", "event": "E", "messageId": "h-poison"})
    assert status == 200
    await until(lambda: "dead-lettered" in relay.log(), 5.0, "the dead-letter line")
    relay.signal(signal.SIGHUP)
    await until(lambda: "reload (SIGHUP)" in relay.log(), 5.0, "the reload line")
    assert await relay.stop() == 0, relay.log()

    lines = relay.log().splitlines()
    assert [bool(HUMAN_LINE.fullmatch(line)) for line in lines] == [True] * 4, lines
    assert [line.split(" ", 3)[2:] for line in lines] == [
        ["INFO", f"relay: listening on 127.0.0.1:{port}; storage {tmp_path / 'relay.db'};"
                 f" write keys any; 0 rule(s); upstreams: seg (segment {upstream.url},"
                 " key SECR…)"],
        ["ERROR", "upstream seg: 1 message(s) dead-lettered, answer 400:"
                  ' {"code": "invalid", "message": "bad message"}'],
        ["INFO", "reload (SIGHUP): 0 rule(s) in force"],
        ["INFO", "relay: stopping; 0 request(s) in flight"],
    ]
    assert leaks(relay.log()) == []


# ---------------------------------------------------------------------------------------------
# 3. The outbox cap: storage.max_bytes with when_full reject and drop_oldest
# ---------------------------------------------------------------------------------------------

Refused = tuple[int, Any, dict[str, str], list[str]]


async def fill_until_refused(http: aiohttp.ClientSession, url: str, tag: str, size: int,
                             tries: int) -> tuple[list[str], Refused]:
    """Sends batches of `size` filler messages until one is not answered 200; returns the ids
    answered 200 and the refused request's status, answer, headers and ids."""
    acked: list[str] = []
    for n in range(tries):
        ids = [f"{tag}-{n}-{i}" for i in range(size)]
        status, answer, headers, _ = await post(http, url + "/v1/batch",
                                                {"batch": [filler(m) for m in ids]})
        if status != 200:
            return acked, (status, answer, headers, ids)
        acked.extend(ids)
    raise AssertionError(f"{tries} batches of {size} messages of {PAD} bytes all answered 200")


async def readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    status, text, _ = await get(http, url + "/readyz")
    return status, json.loads(text)


async def readyz_ok(http: aiohttp.ClientSession, url: str) -> bool:
    return (await readyz(http, url))[0] == 200


NOT_READY = (503, {"ready": False, "storage": False, "forwarders": True})
READY = (200, {"ready": True, "storage": True, "forwarders": True})


@pytest.fixture
def capped(write_config, upstream, tmp_path) -> Callable[[str], tuple[Path, Path]]:
    """Writes a config with storage.max_bytes 1000000 and `when_full`; returns (config, db)."""

    def make(when_full: str) -> tuple[Path, Path]:
        db = tmp_path / "relay.db"
        storage = {"path": str(db), "synchronous": "normal", "max_bytes": CAP,
                   "when_full": when_full}
        return write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                            storage=storage), db

    return make


async def test_full_outbox_answers_503_until_drained(upstream, capped, start_relay, http,
                                                     caplog):
    """At storage.max_bytes (reject) relay answers 503 with Retry-After and fails /readyz,
    stores nothing of that request, and is back to 200 once the vendor drains the outbox,
    which one INFO line says."""
    caplog.set_level("INFO", logger="relay.outbox")
    path, db = capped("reject")
    await upstream.stop()
    async with start_relay(path) as running:
        acked, (status, answer, headers, refused) = await fill_until_refused(
            http, running.url, "cap", 20, 12)
        assert status == 503
        assert set(answer) == {"code", "message"}
        assert answer["code"] == "storage_unavailable"
        assert headers["Retry-After"] == "5"
        assert len(acked) == 80  # four batches of about 206 kB fit; the fifth would pass 1 MB
        assert outbox_ids(db) == acked  # nothing of the refused request was stored
        assert 0.8 * CAP < outbox_bytes(db) <= CAP
        assert await readyz(http, running.url) == NOT_READY
        # The SDK retries the same batch while the vendor is still down: 503 again.
        assert (await post(http, running.url + "/v1/batch",
                           {"batch": [filler(m) for m in refused]}))[0] == 503
        assert outbox_ids(db) == acked

        await upstream.start()
        await until(lambda: readyz_ok(http, running.url), 10.0,
                    "/readyz 200 once the vendor drains the outbox")
        status, _, _, _ = await post(http, running.url + "/v1/batch",
                                     {"batch": [filler(m) for m in refused]})
        assert status == 200
        acked.extend(refused)
        await upstream.wait_for(len(acked))
        await until(lambda: outbox_ids(db) == [], 5.0, "the outbox drained")
        assert await readyz(http, running.url) == READY
        m = await metrics_of(http, running.url)
    assert upstream.accepted_ids() == acked
    assert by(m, "relay_requests_total", "route", "status") == {
        ("/v1/batch", "200"): 5, ("/v1/batch", "503"): 2}
    below = [r for r in caplog.records if "below its cap again" in r.getMessage()]
    assert len(below) == 1 and below[0].levelname == "INFO"


async def test_drop_oldest_keeps_outbox_under_cap_and_counts(
        upstream, capped, start_relay, http, caplog):
    """With when_full: drop_oldest relay never answers 503: it deletes the oldest messages to stay
    at or under the cap, and counts and logs what it dropped."""
    caplog.set_level(logging.INFO)
    path, db = capped("drop_oldest")
    await upstream.stop()
    sent: list[str] = []
    dropped_after: list[int] = []
    async with start_relay(path) as running:
        for n in range(12):
            ids = [f"old-{n}-{i}" for i in range(20)]
            status, _, _, _ = await post(http, running.url + "/v1/batch",
                                         {"batch": [filler(m) for m in ids]})
            assert status == 200, f"batch {n}: {status}"
            sent.extend(ids)
            assert outbox_bytes(db) <= CAP, f"batch {n}"
            dropped_after.append(counters(db).get("dropped.outbox_full", 0))
        kept = outbox_ids(db)
        assert await readyz(http, running.url) == READY
        m = await metrics_of(http, running.url)

        dropped = len(sent) - len(kept)
        assert dropped > 0
        assert kept == sent[dropped:]  # the oldest went first
        assert counters(db)["dropped.outbox_full"] == dropped
        assert by(m, "relay_messages_dropped_total", "rule", "reason") == {
            ("storage", "outbox_full"): dropped}
        first = next(d for d in dropped_after if d)
        lines = [r for r in caplog.records if "outbox at its cap" in r.getMessage()]
        assert [(r.name, r.levelname, r.getMessage()) for r in lines] == [
            ("relay.outbox", "WARNING",
             f"storage: outbox at its cap of {CAP} bytes; dropped the {first} oldest message(s)"
             f" ({first} since start; storage.when_full: drop_oldest)"),
        ]

        await upstream.start()
        await upstream.wait_for(len(kept))
        await until(lambda: outbox_ids(db) == [], 5.0, "the outbox drained")
    assert upstream.accepted_ids() == kept


def ten_waiting(db: Path) -> Path:
    """An outbox file holding ten messages of 100 bytes, ids 1 to 10."""
    with sqlite3.connect(db) as conn:
        conn.executescript(OUTBOX_SCHEMA)
        conn.executemany("INSERT INTO outbox (upstream, write_key, user_key, body, enqueued_at)"
                         " VALUES ('seg', '', 'u', ?, 0)", [("x" * 100,)] * 10)
    return db


async def test_drop_oldest_does_not_count_twice_what_an_ack_removed_meanwhile(tmp_path):
    """When a delivery's ack is counted while drop_oldest is still reading the oldest messages
    (its read saw them before the ack's delete), they are not subtracted a second time: the size
    relay keeps matches the outbox, so the cap holds."""
    db = ten_waiting(tmp_path / "relay.db")
    capacity = Capacity(1000, "drop_oldest")
    async with aiosqlite.connect(db) as conn:
        await capacity.sync(conn)
        admitting = asyncio.create_task(capacity.admit(300, conn))
        await asyncio.sleep(0)  # admit has sent its read of the oldest messages
        capacity.removed({1: 100, 2: 100})  # an ack of the two oldest, committed just before
        statements = await admitting
    dropped = [row[0] for _, rows in statements for row in rows]
    assert dropped == [3]
    assert capacity.used == 700  # ids 4-10: what the outbox holds once both deletes commit
    capacity.added(300)
    assert capacity.used <= capacity.max_bytes


async def test_resync_keeps_dropped_messages_whose_delivery_is_in_flight(tmp_path):
    """The periodic re-read of the outbox's size does not forget which messages drop_oldest
    deleted: a late ack for them frees nothing, so the size relay keeps stays the true one."""
    db = ten_waiting(tmp_path / "relay.db")
    capacity = Capacity(1000, "drop_oldest")
    async with aiosqlite.connect(db, isolation_level=None) as conn:
        await capacity.sync(conn)
        for sql, rows in await capacity.admit(300, conn):  # ids 1-3, being delivered meanwhile
            await conn.executemany(sql, rows)
        await capacity.sync(conn)
        capacity.removed({1: 100, 2: 100, 3: 100, 4: 100})  # their ack, and one for id 4
        await conn.execute("DELETE FROM outbox WHERE id = 4")
        rows = list(await conn.execute_fetchall("SELECT sum(length(body)) FROM outbox"))
    assert capacity.used == rows[0][0] == 600


async def test_drop_oldest_under_cap_while_batches_are_in_flight(
        upstream, capped, start_relay, http):
    """drop_oldest keeps the outbox at or under the cap also when it deletes messages a slow
    vendor is receiving at that moment (their late acks must not be subtracted twice)."""
    path, db = capped("drop_oldest")
    upstream.default = Reply(delay=0.4)
    sizes: list[int] = []
    async with start_relay(path) as running:
        for n in range(14):
            ids = [f"slow-{n}-{i}" for i in range(20)]
            status, _, _, _ = await post(http, running.url + "/v1/batch",
                                         {"batch": [filler(m) for m in ids]})
            assert status == 200, f"batch {n}: {status}"
            sizes.append(outbox_bytes(db))
            await asyncio.sleep(0.15)
        upstream.default = Reply()
    assert len(upstream.requests) >= 3  # batches were in flight while the oldest were dropped
    assert max(sizes) <= CAP, f"outbox bytes after each request: {sizes}"


# ---------------------------------------------------------------------------------------------
# 4. A disk that is really full
# ---------------------------------------------------------------------------------------------


async def command(*args: str) -> tuple[int, str]:
    """Runs a command; returns its exit status and its stderr."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20.0)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace").strip()


@pytest.fixture
async def small_disk(tmp_path) -> AsyncIterator[Path]:
    """A 2 MB tmpfs mounted under tmp_path (skips without root and mount); unmounted after the
    test, once the test's relay processes are killed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    code, err = await command("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    if code != 0:
        pytest.skip(f"this test needs root and mount(8) to make a 2 MB tmpfs: {err}")
    try:
        yield disk
    finally:
        if (await command("umount", str(disk)))[0] != 0:
            await command("umount", "-l", str(disk))


async def test_full_disk_answers_503_and_recovers_by_itself(
        upstream, write_config, small_disk, processes, http):
    """When SQLite's filesystem is full relay (a process) answers 503 with Retry-After and fails
    /readyz without dying; once the filesystem grows it is ready and answers 200 by itself, and
    every message it accepted reaches the vendor."""
    await upstream.stop()
    port = free_port()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        listen=f"127.0.0.1:{port}",
                        storage={"path": str(small_disk / "relay.db"), "synchronous": "normal"})
    relay = RelayProcess(path, port, path.parent)
    processes.append(relay)  # killed before small_disk unmounts: fixtures end in reverse order
    relay.start()
    await relay.wait_ready()

    acked, (status, answer, headers, refused) = await fill_until_refused(
        http, relay.url, "disk", 10, 60)
    assert (status, answer) == (503, {"code": "storage_unavailable", "message": answer["message"]})
    assert "database or disk is full" in answer["message"], relay.log()
    assert headers["Retry-After"] == "5"
    assert len(acked) > 0
    # Still full: more tries are 503 too, never 500, and relay keeps running.
    for _ in range(3):
        status, _, headers, _ = await post(http, relay.url + "/v1/batch",
                                           {"batch": [filler(m) for m in refused]})
        assert (status, headers.get("Retry-After")) == (503, "5")
    assert await readyz(http, relay.url) == NOT_READY
    assert relay.running(), relay.log()
    assert "storage: cannot commit (database or disk is full)" in relay.log()

    code, err = await command("mount", "-o", "remount,size=64m", str(small_disk))
    assert code == 0, err
    # No client sends anything yet: /readyz alone must come back (a pod that is not ready gets
    # no traffic, so waiting for a request to succeed first would wait forever).
    try:
        await until(lambda: readyz_ok(http, relay.url), 6.0, "/readyz 200 with no request")
        ready_alone = True
    except AssertionError:
        ready_alone = False
    status, _, _, _ = await post(http, relay.url + "/v1/batch",
                                 {"batch": [filler(m) for m in refused]})
    assert status == 200, relay.log()
    acked.extend(refused)
    assert await readyz(http, relay.url) == READY
    assert relay.running()

    await upstream.start()
    await upstream.wait_for(len(acked), 20.0)
    assert sorted(upstream.accepted_ids()) == sorted(acked)
    assert await relay.stop() == 0, relay.log()
    assert ready_alone, ("/readyz stayed 503 for 6 s after the filesystem grew, until a request"
                         " committed:\n" + relay.log())


async def test_full_disk_while_delivering_loses_no_forwarder(
        upstream, write_config, small_disk, processes, http):
    """A disk that fills while batches are in flight to a slow vendor (so acks cannot commit)
    leaves relay delivering once it grows: /readyz 200 again and every accepted message sent."""
    upstream.default = Reply(delay=0.3)
    port = free_port()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url,
                          "max_batch_messages": 20}],
                        listen=f"127.0.0.1:{port}",
                        storage={"path": str(small_disk / "relay.db"), "synchronous": "normal"})
    relay = RelayProcess(path, port, path.parent)
    processes.append(relay)
    relay.start()
    await relay.wait_ready()

    acked, (status, answer, _, refused) = await fill_until_refused(
        http, relay.url, "busy", 10, 60)
    assert (status, answer["code"]) == (503, "storage_unavailable"), relay.log()
    await asyncio.sleep(1.0)  # batches in flight come back; their acks meet the full disk
    assert (await readyz(http, relay.url))[0] == 503
    assert relay.running(), relay.log()

    code, err = await command("mount", "-o", "remount,size=64m", str(small_disk))
    assert code == 0, err
    upstream.default = Reply()
    status, _, _, _ = await post(http, relay.url + "/v1/batch",
                                 {"batch": [filler(m) for m in refused]})
    assert status == 200, relay.log()
    acked.extend(refused)
    missing: set[str] = set(acked)

    def delivered() -> bool:
        missing.difference_update(upstream.accepted_ids())
        return not missing

    try:
        await until(delivered, 10.0, "every accepted message delivered after the disk grew")
    except AssertionError:
        pytest.fail(f"{len(missing)} of {len(acked)} accepted messages never reached the vendor"
                    f" after the disk grew; /readyz says {await readyz(http, relay.url)}\n"
                    + relay.log())
    assert await readyz(http, relay.url) == READY
    assert await relay.stop() == 0, relay.log()
    assert "Traceback" not in relay.log(), relay.log()


# ---------------------------------------------------------------------------------------------
# 5. Admin endpoints
# ---------------------------------------------------------------------------------------------


async def test_admin_is_404_without_a_token(upstream, write_config, start_relay, http):
    """With admin.token unset, /admin/report and /admin/queue do not exist: 404."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with start_relay(path) as running:
        assert running.config.admin.token == ""
        for route in ("/admin/report", "/admin/queue"):
            for headers in ({}, bearer(ADMIN_TOKEN), bearer("")):
                assert (await get(http, running.url + route, headers))[0] == 404, route


async def test_admin_needs_the_bearer_token(upstream, write_config, start_relay, http):
    """With admin.token set, a missing, wrong or non-Bearer token gets 401 {"code","message"}."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        admin={"token": ADMIN_TOKEN})
    wrong = [{}, bearer("nope"), bearer(ADMIN_TOKEN + "x"), bearer(ADMIN_TOKEN[:-1]),
             bearer(""), {"Authorization": f"Basic {ADMIN_TOKEN}"},
             {"Authorization": ADMIN_TOKEN}]
    async with start_relay(path) as running:
        for route in ("/admin/report", "/admin/queue"):
            for headers in wrong:
                status, text, answer_headers = await get(http, running.url + route, headers)
                assert status == 401, (route, headers)
                body = json.loads(text)
                assert set(body) == {"code", "message"}, body
                assert body["code"] == "unauthorized"
                assert answer_headers["WWW-Authenticate"] == "Bearer"
                assert ADMIN_TOKEN not in text
            assert (await get(http, running.url + route, bearer(ADMIN_TOKEN)))[0] == 200


async def test_admin_queue_and_report(upstream, write_config, start_relay, http, tmp_path):
    """/admin/queue shows each upstream's messages, bytes, age, dead letters and pause, and
    /admin/report equals `relay report --json` on the same database."""
    path = write_config(
        [{"name": "seg", "kind": "segment", "url": upstream.url}],
        admin={"token": ADMIN_TOKEN},
        rules=[{"type": "one_group_per_user", "inject_into": ["track"]},
               {"type": "drop_internal_users", "email_domains": ["staff.example"]}],
    )
    db = tmp_path / "relay.db"
    upstream.reject = {"adm-poison"}
    batch = [
        {"type": "group", "messageId": "adm-g1", "userId": "u1", "groupId": "g1",
         "timestamp": "2024-01-01T00:00:00Z"},
        {"type": "group", "messageId": "adm-g2", "userId": "u1", "groupId": "g2",
         "timestamp": "2024-01-02T00:00:00Z"},
        {"type": "track", "messageId": "adm-t", "userId": "u1", "event": "Viewed"},
        {"type": "identify", "messageId": "adm-staff", "userId": "staff-1",
         "traits": {"email": "ann@staff.example"}},
        {"type": "track", "messageId": "adm-poison", "userId": "u2", "event": "Bad"},
    ]
    async with start_relay(path) as running:
        queue_url = running.url + "/admin/queue"

        async def queue() -> dict[str, Any]:
            status, text, _ = await get(http, queue_url, bearer(ADMIN_TOKEN))
            assert status == 200, text
            return json.loads(text)  # type: ignore[no-any-return]

        assert (await post(http, running.url + "/v1/batch", {"batch": batch}))[0] == 200
        await upstream.wait_for(3)
        await until(lambda: outbox_ids(db) == [], 5.0, "the outbox drained")
        assert await queue() == {"upstreams": [
            {"upstream": "seg", "messages": 0, "bytes": 0, "oldest_age_seconds": 0,
             "dead_letters": 1, "paused": False}]}

        upstream.default = Reply(401, '{"code":"unauthorized","message":"bad key"}')
        status, _, _, _ = await post(http, running.url + "/v1/track",
                                     {"userId": "u1", "event": "Held", "messageId": "adm-held"})
        assert status == 200
        await upstream.wait_for_requests(len(upstream.requests) + 1)

        async def paused() -> bool:
            return bool((await queue())["upstreams"][0]["paused"])

        await until(paused, 5.0, "seg paused after a 401")
        await asyncio.sleep(0.05)
        answer = await queue()
        age = answer["upstreams"][0]["oldest_age_seconds"]
        assert 0 < age < 30
        assert answer == {"upstreams": [
            {"upstream": "seg", "messages": 1, "bytes": outbox_bytes(db), "oldest_age_seconds": age,
             "dead_letters": 1, "paused": True}]}
        assert outbox_ids(db) == ["adm-held"]

        upstream.default = Reply()
        await upstream.wait_for(4)

        async def resumed() -> bool:
            return not await paused()

        await until(resumed, 5.0, "seg delivering again after the vendor accepts")
        await until(lambda: outbox_ids(db) == [], 5.0, "the outbox drained")

        status, text, _ = await get(http, running.url + "/admin/report", bearer(ADMIN_TOKEN))
        assert status == 200, text
        served = json.loads(text)
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "report", "--json", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
            cwd=str(tmp_path))
        out, err = await asyncio.wait_for(cli.communicate(), 20.0)
        assert cli.returncode == 0, err.decode()

    assert served == json.loads(out)
    assert served["counters"] == {
        "changed.one_group_per_user#0": 2, "dropped.drop_internal_users#1": 1}
    assert served["multi_group_users"] == [
        {"user": "u:u1", "groups": ["g1", "g2"], "tracks_without_group": 2}]
    assert [(u["user"], u["reason"]) for u in served["internal_users"]] == [
        ("u:staff-1", "email_domain")]
    assert upstream.accepted_ids() == ["adm-g1", "adm-g2", "adm-t", "adm-held"]
