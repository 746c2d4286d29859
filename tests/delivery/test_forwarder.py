"""Forwarding from the outbox to real (fake) vendors: delivery, refusals, retries, order, batches.

Every test runs relay in-process, sends over HTTP to its inbound routes and watches a FakeUpstream
and the SQLite file; failures are scripted answers of the fake, never mocks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream, Received, Reply

KEY = "abc123"
Message = dict[str, Any]


# ---------------------------------------------------------------- helpers


def basic(key: str) -> str:
    """The Authorization value SDKs and vendors use: Basic base64("key:")."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def tracks(user: str, count: int, start: int = 0, pad: int = 0) -> list[Message]:
    """`count` track calls of `user`, messageIds `user-<i>`, optionally padded to grow them."""
    out = []
    for i in range(start, start + count):
        message: Message = {"type": "track", "userId": user, "event": "Clicked",
                            "messageId": f"{user}-{i}", "properties": {"i": i}}
        if pad:
            message["properties"]["pad"] = "x" * pad
        out.append(message)
    return out


def ids(messages: Iterable[Message]) -> list[str]:
    return [m["messageId"] for m in messages]


async def post(http: aiohttp.ClientSession, relay: Any, path: str, payload: Any,
               key: str = KEY) -> None:
    """One SDK request to relay, which must answer 200 (stored)."""
    async with http.post(relay.url + path, json=payload,
                         headers={"Authorization": basic(key)}) as resp:
        assert resp.status == 200, await resp.text()


async def send(http: aiohttp.ClientSession, relay: Any, messages: list[Message],
               key: str = KEY) -> list[str]:
    """`messages` as one /v1/batch request; returns their ids."""
    await post(http, relay, "/v1/batch", {"batch": messages}, key)
    return ids(messages)


def db(relay: Any) -> str:
    return str(relay.config.storage.path)


def outbox_count(relay: Any, upstream: str | None = None) -> int:
    """Rows waiting in the outbox (of one upstream, or all)."""
    sql, args = "SELECT count(*) FROM outbox", ()
    if upstream is not None:
        sql, args = sql + " WHERE upstream = ?", (upstream,)
    with contextlib.closing(sqlite3.connect(db(relay))) as conn:
        return int(conn.execute(sql, args).fetchone()[0])


def dead_letters(relay: Any) -> list[tuple[str, int, str, str]]:
    """Every dead letter as (upstream, status, answer, messageId), oldest first."""
    with contextlib.closing(sqlite3.connect(db(relay))) as conn:
        rows = conn.execute(
            "SELECT upstream, status, answer, body FROM dead_letters ORDER BY id").fetchall()
    return [(u, s, a, json.loads(b)["messageId"]) for u, s, a, b in rows]


async def until(check: Callable[[], bool], seconds: float = 10.0, what: str = "") -> None:
    """Polls `check` (state relay writes just after the vendor answers) until it holds."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what or check}")
        await asyncio.sleep(0.02)


async def retried_after_sends(relay: Any, attempts: int = 2) -> None:
    """Waits for `attempts` more refused tries: the last one read every message sent so far."""
    forwarder = relay.relay.forwarders[0]
    target = forwarder.failures + attempts
    await until(lambda: forwarder.failures >= target, seconds=5, what=f"{attempts} more tries")


async def drained(relay: Any) -> None:
    await until(lambda: outbox_count(relay) == 0, what="an empty outbox")


def batch_ids(request: Received) -> list[str]:
    return ids(request.body.get("batch", []))


def ok_requests(fake: FakeUpstream) -> list[Received]:
    return [r for r in fake.requests if 200 <= r.status < 300]


def sent_at(request: Received) -> datetime:
    value = request.body["sentAt"]
    assert isinstance(value, str) and value.endswith("Z"), value
    return datetime.fromisoformat(value)


def seg(upstream: FakeUpstream, name: str = "seg", **options: Any) -> dict[str, Any]:
    """One segment-kind upstream entry for write_config."""
    return {"name": name, "kind": "segment", "url": upstream.url, **options}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ---------------------------------------------------------------- 2xx


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_2xx_delivers_in_order_and_empties_outbox(
    status, upstream, write_config, start_relay, http
):
    """Messages from every kind of route are delivered in order, and a 2xx removes them."""
    upstream.default = Reply(status, "" if status == 204 else '{"success": true}')
    path = write_config([seg(upstream)])
    sent: list[str] = []
    async with start_relay(path) as relay:
        for route in ("/v1/track", "/v1/identify", "/v1/page", "/sdk/track"):
            message = {"userId": "u", "messageId": f"single-{route}", "event": "E"}
            await post(http, relay, route, message)
            sent.append(message["messageId"])
        sent += await send(http, relay, tracks("u", 6))
        got = await upstream.wait_for(len(sent), seconds=5)
        await drained(relay)
        assert dead_letters(relay) == []
    assert ids(got) == sent
    assert [m["type"] for m in got[:4]] == ["track", "identify", "page", "track"]
    assert all(r.status == status for r in upstream.requests)


# ---------------------------------------------------------------- 400 / 413: bisect


@pytest.mark.parametrize(
    ("reply", "poison"),
    [
        (Reply(400, '{"code":"invalid","message":"bad message"}'), ["u-6"]),
        (Reply(413, "Request size exceeds max limit"), ["u-0", "u-9"]),
    ],
    ids=["400", "413"],
)
async def test_refused_batch_is_bisected_to_the_poison_message(
    *, reply, poison, upstream, write_config, start_relay, http
):
    """A 400/413 batch is split until only the refused message is dead-lettered; the rest arrive."""
    upstream.reject = set(poison)
    upstream.reject_reply = reply
    path = write_config([seg(upstream)])
    async with start_relay(path) as relay:
        sent = await send(http, relay, tracks("u", 10))
        good = [i for i in sent if i not in poison]
        got = await upstream.wait_for(len(good), seconds=5)
        await until(lambda: len(dead_letters(relay)) == len(poison), what="dead letters")
        await drained(relay)
        dead = dead_letters(relay)
        bisecting = len(upstream.requests)
        later = await send(http, relay, tracks("v", 2))
        await upstream.wait_for(len(good) + 2, seconds=5)
    assert ids(got) == good
    assert dead == [("seg", reply.status, reply.body, p) for p in poison]
    assert batch_ids(upstream.requests[0]) == sent  # first tried whole
    assert upstream.requests[0].status == reply.status
    assert bisecting <= 1 + 2 * 4 * len(poison)  # halving 10 messages, not one by one (11)
    assert upstream.accepted_ids()[len(good):] == later


# ---------------------------------------------------------------- 401 / 403: pause


@pytest.mark.parametrize("status", [401, 403, 307, 404])
async def test_auth_refusal_pauses_and_keeps_messages_until_key_fixed(
    *, status, upstream, write_config, start_relay, http, caplog
):
    """On 401/403, a 3xx or a 404 (a wrong url: the batch path is not there) the upstream
    pauses, retrying every pause_seconds, losing nothing; a 404's log line says to check url."""
    caplog.set_level("ERROR", logger="relay.forwarder")
    upstream.default = Reply(status, '{"code":"unauthorized","message":"Invalid Write Key"}',
                             headers={"Location": upstream.url + "/elsewhere"})
    path = write_config([seg(upstream, pause_seconds=0.4)])
    async with start_relay(path) as relay:
        sent = await send(http, relay, tracks("u", 5))
        refused = await upstream.wait_for_requests(3, seconds=5)
        sent += await send(http, relay, tracks("u", 5, start=5))  # more while paused
        assert outbox_count(relay) == 10
        assert dead_letters(relay) == []
        assert upstream.accepted() == []
        upstream.default = Reply()  # key fixed
        got = await upstream.wait_for(10, seconds=5)
        await drained(relay)
        assert dead_letters(relay) == []
    assert ids(got) == sent
    gaps = [b.at - a.at for a, b in itertools.pairwise(refused[:3])]
    assert all(gap >= 0.3 for gap in gaps), gaps  # paused, not backed off at 0.05-0.2 s
    assert all(batch_ids(r) == sent[:5] for r in refused[:3])
    paused = [r.getMessage() for r in caplog.records if "paused" in r.getMessage()]
    assert len(paused) == 1
    assert ("is no segment batch endpoint: check its url" in paused[0]) == (status == 404)


# ---------------------------------------------------------------- other 4xx: dead letters


LONG = '{"code":"unprocessable","message":"' + "x" * 3000 + '"}'


@pytest.mark.parametrize(("status", "body"), [(422, LONG), (409, "conflict")],
                         ids=["422", "409"])
async def test_other_4xx_dead_letters_the_batch(
    *, status, body, upstream, write_config, start_relay, http
):
    """A 422 (or another 4xx not named above) moves the whole batch to dead_letters with its
    status and answer, no retry."""
    upstream.default = Reply(status, body)
    path = write_config([seg(upstream)])
    async with start_relay(path) as relay:
        sent = await send(http, relay, tracks("u", 4))
        await until(lambda: len(dead_letters(relay)) == 4, seconds=5, what="4 dead letters")
        assert outbox_count(relay) == 0
        dead = dead_letters(relay)
        upstream.default = Reply()
        later = await send(http, relay, tracks("v", 2))  # relay keeps delivering afterwards
        got = await upstream.wait_for(2, seconds=5)
    assert [(u, s, m) for u, s, _, m in dead] == [("seg", status, m) for m in sent]
    assert all(answer == body[:500] for _, _, answer, _ in dead)  # docs/delivery.md: first 500
    assert [r.status for r in upstream.requests] == [status, 200]
    assert ids(got) == later


# ---------------------------------------------------------------- retryable answers


def assert_once_in_order(got: list[str], sent: list[str], may_repeat: bool) -> None:
    """All of `sent` arrived in order; repeats only allowed when a batch was left in flight."""
    first = list(dict.fromkeys(got))
    assert first == sent
    if not may_repeat:
        assert got == sent, Counter(got) - Counter(sent)


RETRYABLE = {
    "408": ([Reply(408)], {}, False),
    "410-460": ([Reply(410), Reply(460)], {}, False),
    "429-no-retry-after": ([Reply(429, "Max Requests Limit reached")] * 2, {}, False),
    "5xx-streak": ([Reply(s) for s in (500, 502, 503, 504, 500, 502, 503, 504)], {}, False),
    "slow-answer": ([Reply(delay=1.5)], {"timeout_seconds": 0.4}, True),
    "hang": ([Reply(hang=True)], {"timeout_seconds": 0.4}, False),
    "reset": ([Reply(reset=True), Reply(reset=True)], {}, False),
}


@pytest.mark.parametrize(("script", "options", "in_flight"), list(RETRYABLE.values()),
                         ids=list(RETRYABLE))
async def test_retryable_failures_lose_nothing(
    *, script, options, in_flight, upstream, write_config, start_relay, http
):
    """Retryable answers (408/410/429/460/5xx, timeouts, resets) resend the batch until it lands."""
    upstream.script.extend(script)
    path = write_config([seg(upstream, **options)])
    async with start_relay(path) as relay:
        sent = await send(http, relay, tracks("u", 10))
        await upstream.wait_for(10, seconds=10)
        await drained(relay)
        assert dead_letters(relay) == []
    recorded = [r for r in script if not (r.hang or r.delay)]
    assert [r.status for r in upstream.requests][: len(recorded) + 1] == [
        0 if r.reset else r.status for r in recorded] + [200]
    assert all(batch_ids(r) == sent for r in upstream.requests)
    assert_once_in_order(upstream.accepted_ids(), sent, in_flight)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_honoured(form, upstream, write_config, start_relay, http):
    """A 429 with Retry-After (seconds or HTTP date) delays the retry at least that long."""
    if form == "seconds":
        value = "1"
    else:
        value = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    upstream.script.append(Reply(429, "slow down", headers={"Retry-After": value}))
    path = write_config([seg(upstream)])
    async with start_relay(path) as relay:
        sent = await send(http, relay, tracks("u", 3))
        got = await upstream.wait_for(3, seconds=6)
        assert dead_letters(relay) == []
    first, retry = upstream.requests[:2]
    assert 0.8 <= retry.at - first.at < 3.5, retry.at - first.at
    assert ids(got) == sent


async def test_vendor_stopped_then_back(upstream, write_config, start_relay, http):
    """Messages are stored before the 200, kept while the vendor refuses connections, then sent."""
    path = write_config([seg(upstream)])
    async with start_relay(path) as relay:
        forwarder = relay.relay.forwarders[0]
        await upstream.stop()
        sent = await send(http, relay, tracks("u", 10))
        assert outbox_count(relay) == 10  # durable before the answer
        await until(lambda: forwarder.failures >= 3, seconds=5, what="3 refused attempts")
        sent += await send(http, relay, tracks("u", 5, start=10))
        assert outbox_count(relay) == 15
        assert dead_letters(relay) == []
        await upstream.start()
        got = await upstream.wait_for(15, seconds=5)
        await drained(relay)
        assert dead_letters(relay) == []
    assert ids(got) == sent


async def test_a_vendor_back_during_a_long_backoff_is_found_within_seconds(
        upstream, write_config, start_relay, http):
    """The vendor refuses connections, so relay backs off 30-60 s; the vendor comes back 1 s
    later and relay, asking with a bare TCP connect every 2 s (nothing sent), delivers within
    seconds, not at the end of the backoff. While it is down, those connects are all it does."""
    path = write_config([seg(upstream, backoff_initial_seconds=60, backoff_max_seconds=60)])
    async with start_relay(path) as relay:
        forwarder = relay.relay.forwarders[0]
        await upstream.stop()
        sent = await send(http, relay, tracks("u", 3))
        await until(lambda: forwarder.failures >= 1, seconds=5, what="a refused attempt")
        await asyncio.sleep(1.0)
        assert forwarder.failures == 1  # waiting out its backoff, not trying again
        back = time.monotonic()
        await upstream.start()
        got = await upstream.wait_for(3, seconds=10)
        took = time.monotonic() - back
    assert ids(got) == sent
    assert took < 2.0 + 3.0  # one probe interval, and the machine's noise


# ---------------------------------------------------------------- order


async def test_per_user_order_kept_across_retries(upstream, write_config, start_relay, http):
    """3 users x 30 interleaved messages arrive per user in accepted order despite failures."""
    upstream.script.extend([Reply(500), Reply(), Reply(503), Reply(reset=True), Reply(),
                            Reply(429), Reply(502), Reply(), Reply(504), Reply(408)])
    path = write_config([seg(upstream, max_batch_messages=8)])
    users = ["ann", "bob", "cid"]
    interleaved = [m for i in range(30) for u in users for m in tracks(u, 1, start=i)]
    async with start_relay(path) as relay:
        sent: list[str] = []
        for start in range(0, len(interleaved), 9):
            sent += await send(http, relay, interleaved[start:start + 9])
        await upstream.wait_for(90, seconds=15)
        await drained(relay)
        assert dead_letters(relay) == []
    got = upstream.accepted()
    assert sorted(ids(got)) == sorted(sent)
    assert len(got) == 90  # no duplicates: nothing was answered 2xx twice
    for user in users:
        assert [m["messageId"] for m in got if m["userId"] == user] == ids(tracks(user, 30))
    assert sum(1 for r in upstream.requests if r.status != 200) == 7


# ---------------------------------------------------------------- fan-out


@pytest.mark.parametrize("failure", ["stopped", "hanging"])
async def test_fan_out_one_upstream_down_does_not_delay_the_other(
    failure, upstream, write_config, start_relay, http
):
    """Both upstreams get every message; the healthy one keeps up while the other is down."""
    other = FakeUpstream()
    await other.start()
    try:
        path = write_config([seg(upstream, name="a"),
                             seg(other, name="b", timeout_seconds=1.5)])
        async with start_relay(path) as relay:
            if failure == "stopped":
                await other.stop()
            else:
                other.default = Reply(hang=True)
            sent: list[str] = []
            started = time.monotonic()
            for round_ in range(4):
                sent += await send(http, relay, tracks("u", 5, start=5 * round_))
                await upstream.wait_for(len(sent), seconds=1.0)
            assert time.monotonic() - started < 2.0
            await until(lambda: outbox_count(relay, "a") == 0, seconds=2, what="a drained")
            assert outbox_count(relay, "b") == 20
            assert other.accepted() == []
            if failure == "stopped":
                await other.start()
            else:
                other.default = Reply()
            got_b = await other.wait_for(20, seconds=10)
            await drained(relay)
            assert dead_letters(relay) == []
    finally:
        await other.stop()
    assert upstream.accepted_ids() == sent
    assert_once_in_order(ids(got_b), sent, may_repeat=failure == "hanging")


# ---------------------------------------------------------------- vendor kinds and keys


@pytest.mark.parametrize(
    ("kind", "route", "body_key"),
    [("segment", "/v1/batch", True), ("june", "/sdk/batch", False),
     ("rudderstack", "/v1/batch", False)],
)
async def test_vendor_kind_path_auth_and_body(
    *, kind, route, body_key, upstream, write_config, start_relay, http
):
    """Each kind gets its batch path, Basic base64("key:"), writeKey in body only for segment."""
    path = write_config([{"name": "up", "kind": kind, "url": upstream.url}])
    async with start_relay(path) as relay:
        before = datetime.now(UTC)
        sent = await send(http, relay, tracks("u", 3))
        got = await upstream.wait_for(3, seconds=5)
        after = datetime.now(UTC)
    (request,) = upstream.requests
    assert request.path == route
    assert request.headers["Authorization"] == "Basic YWJjMTIzOg=="  # the docs' example for abc123
    assert request.headers["Content-Type"].startswith("application/json")
    assert ("writeKey" in request.body) is body_key
    if body_key:
        assert request.body["writeKey"] == KEY
    assert before - timedelta(milliseconds=1) <= sent_at(request) <= after
    assert ids(got) == sent
    assert all("writeKey" not in m and "sentAt" not in m for m in got)


async def test_sent_at_is_stamped_at_each_send(upstream, write_config, start_relay, http):
    """Every attempt carries a fresh top-level sentAt, later than relay's receivedAt."""
    upstream.script.append(Reply(401))
    path = write_config([seg(upstream, pause_seconds=0.4)])
    async with start_relay(path) as relay:
        before = datetime.now(UTC)
        await send(http, relay, tracks("u", 2))
        got = await upstream.wait_for(2, seconds=5)
        after = datetime.now(UTC)
    first, retry = upstream.requests
    assert before - timedelta(milliseconds=1) <= sent_at(first) <= sent_at(retry) <= after
    assert sent_at(retry) - sent_at(first) >= timedelta(seconds=0.3)
    received = max(datetime.fromisoformat(m["receivedAt"]) for m in got)
    assert sent_at(retry) - received >= timedelta(seconds=0.3)


async def test_upstream_write_key_replaces_sdk_keys(upstream, write_config, start_relay, http):
    """An upstream with its own write_key sends every batch with it, whatever key the SDK used."""
    path = write_config([seg(upstream, write_key="UPSTREAM-KEY")])
    async with start_relay(path) as relay:
        await upstream.stop()
        sent = await send(http, relay, tracks("a", 5), key="sdk-A")
        sent += await send(http, relay, tracks("b", 5), key="sdk-B")
        await retried_after_sends(relay)  # so the first batch sees them all
        await upstream.start()
        got = await upstream.wait_for(10, seconds=5)
    assert ids(got) == sent
    assert len(ok_requests(upstream)) == 1  # one key for all, so one batch
    for request in upstream.requests:
        assert request.headers["Authorization"] == basic("UPSTREAM-KEY")
        assert request.body["writeKey"] == "UPSTREAM-KEY"


async def test_batches_grouped_by_sdk_key(upstream, write_config, start_relay, http):
    """Without an upstream write_key, each batch holds one SDK key's messages and uses that key."""
    path = write_config([seg(upstream)])
    by_key: dict[str, list[str]] = {"key-A": [], "key-B": []}
    async with start_relay(path) as relay:
        await upstream.stop()
        for round_ in range(2):
            for key, user in (("key-A", "a"), ("key-B", "b")):
                by_key[key] += await send(http, relay, tracks(user, 5, start=5 * round_), key=key)
        await retried_after_sends(relay)  # so the first batch sees them all
        await upstream.start()
        await upstream.wait_for(20, seconds=5)
    assert [(r.body["writeKey"], batch_ids(r)) for r in ok_requests(upstream)] == [
        ("key-A", by_key["key-A"]), ("key-B", by_key["key-B"])]
    for request in upstream.requests:
        assert request.headers["Authorization"] == basic(request.body["writeKey"])
        key_ids = by_key[request.body["writeKey"]]
        assert set(batch_ids(request)) <= set(key_ids)


# ---------------------------------------------------------------- batch limits


async def test_max_batch_messages_respected(upstream, write_config, start_relay, http):
    """With max_batch_messages 7, a 50-message backlog goes out as 7 x 7 + 1, in order."""
    path = write_config([seg(upstream, max_batch_messages=7)])
    async with start_relay(path) as relay:
        await upstream.stop()
        sent: list[str] = []
        for start in range(0, 50, 10):
            sent += await send(http, relay, tracks("u", 10, start=start))
        await retried_after_sends(relay)  # so the first batch sees them all
        await upstream.start()
        got = await upstream.wait_for(50, seconds=5)
    assert [len(r.body["batch"]) for r in ok_requests(upstream)] == [7] * 7 + [1]
    assert all(len(r.body["batch"]) <= 7 for r in upstream.requests)
    assert ids(got) == sent


async def test_backlog_of_full_batches_and_two_keys_goes_out_in_order(
    upstream, write_config, start_relay, http
):
    """A backlog of full batches (each next one read while the last is sent) under two SDK keys,
    with retries between: every message is accepted once, in stored order, each batch one key's."""
    upstream.script.extend([Reply(), Reply(500), Reply(), Reply(503), Reply(reset=True)])
    path = write_config([seg(upstream, max_batch_messages=5)])
    async with start_relay(path) as relay:
        await upstream.stop()
        sent = await send(http, relay, tracks("a", 10), key="key-A")
        sent += await send(http, relay, tracks("b", 10), key="key-B")
        sent += await send(http, relay, tracks("a", 10, start=10), key="key-A")
        await retried_after_sends(relay)
        await upstream.start()
        await upstream.wait_for(30, seconds=10)
        await drained(relay)
        assert dead_letters(relay) == []
    done = 0
    for request in upstream.requests:  # each one, failed ones too, starts where 2xx ones ended
        assert batch_ids(request) == sent[done:done + len(batch_ids(request))]
        done += len(batch_ids(request)) if request.status == 200 else 0
    assert upstream.accepted_ids() == sent
    assert [(r.body["writeKey"], len(r.body["batch"])) for r in ok_requests(upstream)] == [
        ("key-A", 5), ("key-A", 5), ("key-B", 5), ("key-B", 5), ("key-A", 5), ("key-A", 5)]


async def test_a_batch_is_read_back_exactly_as_stored(upstream, write_config, start_relay, http):
    """Bodies come back from the outbox exactly as stored and in order: relay's own, bodies with
    characters beyond ASCII, and one holding a NUL (SQLite's length() stops at it, so that read
    falls back to quoting every body)."""
    path = write_config([seg(upstream)])
    async with start_relay(path) as relay:
        await upstream.stop()
        await send(http, relay, tracks("u", 3))
        odd = ['{"event":"caf\u00e9 \u2615 \U0001d11e"}', '{"event":"a\x00b"}', '{"n":1}']
        with contextlib.closing(sqlite3.connect(db(relay), isolation_level=None)) as conn:
            for body in odd:
                conn.execute("INSERT INTO outbox (upstream, write_key, user_key, body, enqueued_at)"
                             " VALUES ('seg', ?, 'u:x', ?, 1.5)", (KEY, body))
            stored = conn.execute("SELECT id, body FROM outbox ORDER BY id").fetchall()
        outbox = relay.relay.outbox
        for holds_nul in (True, False):
            batch = await outbox.next_batch("seg", 500, 500_000, by_key=True)
            assert [(p.id, p.body) for p in batch] == stored
            assert [p.write_key for p in batch] == [KEY] * 6
            assert batch[-1].enqueued_at == 1.5 and batch[-1].user_key == "u:x"
            after = await outbox.next_batch("seg", 500, 500_000, by_key=True, after=batch[1].id)
            assert [(p.id, p.body) for p in after] == stored[2:]
            if holds_nul:
                with contextlib.closing(sqlite3.connect(db(relay), isolation_level=None)) as conn:
                    conn.execute("UPDATE outbox SET body = '{}' WHERE id = ?", (stored[4][0],))
                    stored = conn.execute("SELECT id, body FROM outbox ORDER BY id").fetchall()


async def test_a_delete_that_fails_after_delivery_loses_nothing(
    upstream, write_config, start_relay, http
):
    """While SQLite refuses to delete delivered messages (a trigger aborts every delete), they
    stay stored and go out again; once deletes work, every message has arrived and the outbox
    empties, each batch starting where the last delivered one ended or at the oldest kept."""
    path = write_config([seg(upstream, max_batch_messages=5)])
    async with start_relay(path) as relay:
        await upstream.stop()
        sent = await send(http, relay, tracks("u", 15))
        with contextlib.closing(sqlite3.connect(db(relay), isolation_level=None)) as conn:
            conn.execute("CREATE TRIGGER refuse BEFORE DELETE ON outbox"
                         " BEGIN SELECT RAISE(ABORT, 'deletes refused'); END")
        await upstream.start()
        await until(lambda: len(upstream.requests) >= 4, seconds=10, what="batches sent again")
        assert outbox_count(relay) == 15  # none deleted, so none lost
        with contextlib.closing(sqlite3.connect(db(relay), isolation_level=None)) as conn:
            conn.execute("DROP TRIGGER refuse")
        await drained(relay)
    assert set(upstream.accepted_ids()) == set(sent)
    assert batch_ids(upstream.requests[0]) == sent[:5]
    for request in upstream.requests:
        first = sent.index(batch_ids(request)[0])
        assert batch_ids(request) == sent[first:first + len(batch_ids(request))]
    assert len(upstream.accepted_ids()) > len(sent)  # what could not be deleted went again


async def test_a_clean_stop_right_after_delivery_sends_nothing_twice(
    upstream, write_config, start_relay, http
):
    """The delete of the last delivered batch commits before relay stops: started again on the
    same file, relay has nothing left to send."""
    path = write_config([seg(upstream, max_batch_messages=5)])
    async with start_relay(path) as relay:
        await upstream.stop()
        sent = await send(http, relay, tracks("u", 20))
        await upstream.start()
        await upstream.wait_for(20, seconds=10)
    assert upstream.accepted_ids() == sent
    async with start_relay(path) as relay:
        assert outbox_count(relay) == 0
        await asyncio.sleep(0.3)
    assert upstream.accepted_ids() == sent


LONGEST_KEY = "k" * 256  # the longest write key relay accepts; segment batches carry it in the body


@pytest.mark.parametrize(("limit", "key"), [(1024, KEY), (2048, KEY), (1024, LONGEST_KEY)],
                         ids=["1024", "2048", "1024-longest-key"])
async def test_max_batch_bytes_respected(
    *, limit, key, upstream, write_config, start_relay, http
):
    """No batch body exceeds max_batch_bytes, and batches are still filled with several messages."""
    path = write_config([seg(upstream, max_batch_bytes=limit)])
    async with start_relay(path) as relay:
        await upstream.stop()
        sent: list[str] = []
        for start in range(0, 40, 10):
            messages = tracks("u", 10, start=start)
            for m in messages:  # sizes from ~150 to ~270 bytes, so batches end close to the limit
                m["properties"]["pad"] = "x" * (m["properties"]["i"] * 53 % 120)
            sent += await send(http, relay, messages, key=key)
        await retried_after_sends(relay)  # so the first batch sees them all
        await upstream.start()
        got = await upstream.wait_for(40, seconds=5)
    sizes = [r.size for r in upstream.requests]
    assert max(sizes) <= limit, f"batch bodies of {sizes} bytes, limit {limit}"
    assert all(int(r.headers["Content-Length"]) == r.size for r in upstream.requests)
    assert all(len(r.body["batch"]) >= 2 for r in upstream.requests[:-1])
    assert ids(got) == sent


# ---------------------------------------------------------------- gzip


@pytest.mark.parametrize("route", ["/v1/batch", "/v1/import"])
async def test_gzip_input_forwarded_without_content_encoding(
    route, upstream, write_config, start_relay, http
):
    """Messages a client sent gzip-compressed are forwarded as plain JSON, no Content-Encoding."""
    path = write_config([seg(upstream)])
    messages = tracks("u", 20, pad=50)
    async with start_relay(path) as relay:
        body = gzip.compress(json.dumps({"batch": messages}).encode())
        headers = {"Authorization": basic(KEY), "Content-Encoding": "gzip",
                   "Content-Type": "application/json"}
        async with http.post(relay.url + route, data=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        got = await upstream.wait_for(20, seconds=5)
    assert ids(got) == ids(messages)
    for request in upstream.requests:
        assert "content-encoding" not in {h.lower() for h in request.headers}
        assert int(request.headers["Content-Length"]) == request.size
