"""relay driven by the real Python SDKs (segment-analytics-python, june-analytics-python)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from fakes import FakeUpstream
from june.analytics.client import Client as JuneClient
from segment.analytics import request as segment_request
from segment.analytics.client import Client as SegmentClient

SEG_KEY = "WK_seg_sdk"
JUNE_KEY = "WK_june_sdk"
# No SDK retries: relay must answer 200 at the first try, and a retry would hide a refusal.
SDK_OPTIONS: dict[str, Any] = {"upload_interval": 0.05, "max_retries": 0, "timeout": 5}
EXPECTED_TYPES = ["identify", "track", "group", "page", "screen", "alias"]
SKEW_TOLERANCE = timedelta(milliseconds=2)

Errors = list[tuple[Exception, list[dict[str, Any]]]]


def basic(key: str) -> str:
    """The Authorization header value for `key` as the SDKs and relay write it."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@contextlib.asynccontextmanager
async def sdk_client(cls: Callable[..., Any], key: str, host: str, errors: Errors,
                     **options: Any) -> AsyncIterator[Any]:
    """An SDK client posting to `host`; every upload error lands in `errors`; shut down after."""
    client = cls(write_key=key, host=host,
                 on_error=lambda exc, batch: errors.append((exc, batch)),
                 **{**SDK_OPTIONS, **options})
    try:
        yield client
    finally:
        await asyncio.to_thread(client.shutdown)


def send_all_types(client: Any, user: str) -> list[dict[str, Any]]:
    """identify, track (with context.groupId), group, page, screen, alias; the messages queued."""
    calls = [
        client.identify(user, {"email": f"{user}@example.com"}),
        client.track(user, "Signed Up", {"plan": "pro"}, context={"groupId": "g1"}),
        client.group(user, "g1", {"name": "Acme"}),
        client.page(user, name="Home", properties={"url": "http://x"}),
        client.screen(user, name="Main"),
        client.alias("anon-" + user, user),
    ]
    assert all(ok for ok, _ in calls)
    return [dict(msg) for _, msg in calls]


def check_delivered(got: list[dict[str, Any]], sent: list[dict[str, Any]]) -> None:
    """`got` is exactly `sent`, in order, as relay must forward it: fields kept, receivedAt added,
    timestamp within a second of the client's (no skew), no envelope fields, no context.ip."""
    assert [m["messageId"] for m in got] == [m["messageId"] for m in sent]
    assert [m["type"] for m in got] == EXPECTED_TYPES
    for out, original in zip(got, sent, strict=True):
        assert {k: v for k, v in out.items() if k not in ("receivedAt", "timestamp")} == {
            k: v for k, v in original.items() if k != "timestamp"
        }
        assert "ip" not in out["context"]  # a server SDK: the vendor would not fill it
        shift = parse_time(out["timestamp"]) - parse_time(original["timestamp"])
        assert abs(shift) < timedelta(seconds=1)
        assert abs(parse_time(out["receivedAt"]) - datetime.now(UTC)) < timedelta(seconds=30)
    assert got[1]["context"]["groupId"] == "g1"


async def test_segment_sdk_calls_reach_upstream(upstream, write_config, start_relay):
    """Every call type from segment-analytics-python reaches a segment upstream unchanged."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    errors: Errors = []
    async with start_relay(path) as relay:
        async with sdk_client(SegmentClient, SEG_KEY, relay.url, errors) as client:
            sent = send_all_types(client, "u-seg")
            await asyncio.to_thread(client.flush)
        got = await upstream.wait_for(len(sent))
    assert errors == []
    check_delivered(got, sent)
    for req in upstream.requests:
        assert req.path == "/v1/batch"
        assert req.headers["Authorization"] == basic(SEG_KEY)
        assert req.body["writeKey"] == SEG_KEY
        assert isinstance(req.body["sentAt"], str)


async def test_segment_sdk_gzip_arrives_decompressed(upstream, write_config, start_relay):
    """gzip=True batches from segment-analytics-python reach the vendor as plain JSON."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    errors: Errors = []
    async with start_relay(path) as relay:
        async with sdk_client(SegmentClient, SEG_KEY, relay.url, errors, gzip=True) as client:
            assert all(c.gzip for c in client.consumers)
            sent = send_all_types(client, "u-gzip")
            await asyncio.to_thread(client.flush)
        got = await upstream.wait_for(len(sent))
    assert errors == []
    check_delivered(got, sent)
    for req in upstream.requests:
        lowered = {k.lower(): v for k, v in req.headers.items()}
        assert "content-encoding" not in lowered
        assert lowered["content-type"] == "application/json"
        assert req.headers["Authorization"] == basic(SEG_KEY)
        assert req.body["writeKey"] == SEG_KEY


async def test_june_sdk_reaches_june_and_segment_upstreams(upstream, write_config, start_relay):
    """june-analytics-python's batches reach a june and a segment upstream, each in its form."""
    june = FakeUpstream()
    await june.start()
    try:
        path = write_config([
            {"name": "june", "kind": "june", "url": june.url},
            {"name": "seg", "kind": "segment", "url": upstream.url},
        ])
        errors: Errors = []
        async with start_relay(path) as relay:
            async with sdk_client(JuneClient, JUNE_KEY, relay.url, errors) as client:
                sent = send_all_types(client, "u-june")
                await asyncio.to_thread(client.flush)
            got_june = await june.wait_for(len(sent))
            got_seg = await upstream.wait_for(len(sent))
    finally:
        await june.stop()
    assert errors == []
    check_delivered(got_june, sent)
    check_delivered(got_seg, sent)
    for req in june.requests:
        assert req.path == "/sdk/batch"
        assert req.headers["Authorization"] == basic(JUNE_KEY)
        assert "writeKey" not in req.body
    for req in upstream.requests:
        assert req.path == "/v1/batch"
        assert req.headers["Authorization"] == basic(JUNE_KEY)
        assert req.body["writeKey"] == JUNE_KEY


def first_seen(ids: list[str]) -> list[str]:
    """`ids` with repeats removed, each at its first arrival."""
    return list(dict.fromkeys(ids))


async def test_vendor_down_loses_nothing_and_keeps_user_order(upstream, write_config,
                                                              start_relay):
    """With the vendor down both SDKs get 200s; once it is back every message arrives, per-user
    order kept, on both a segment and a june upstream."""
    june = FakeUpstream()  # not started: down from the beginning
    await upstream.stop()
    rounds = 50
    users = {SEG_KEY: ["s1", "s2", "s3", "s4"], JUNE_KEY: ["j1", "j2", "j3"]}
    order: dict[str, list[str]] = {}  # user -> messageIds in the order the SDK queued them
    key_of: dict[str, str] = {}  # messageId -> write key of the SDK that sent it
    errors: Errors = []
    try:
        path = write_config([
            {"name": "seg", "kind": "segment", "url": upstream.url},
            {"name": "june", "kind": "june", "url": june.url},
        ])
        async with start_relay(path) as relay:
            async with sdk_client(SegmentClient, SEG_KEY, relay.url, errors) as seg, \
                    sdk_client(JuneClient, JUNE_KEY, relay.url, errors) as jun:
                for i in range(rounds):
                    for key, client in ((SEG_KEY, seg), (JUNE_KEY, jun)):
                        for user in users[key]:
                            ok, msg = client.track(user, f"Step {i}", {"seq": i})
                            assert ok
                            order.setdefault(user, []).append(msg["messageId"])
                            key_of[msg["messageId"]] = key
                await asyncio.gather(asyncio.to_thread(seg.flush), asyncio.to_thread(jun.flush))
            total = len(key_of)
            assert total == rounds * 7
            assert errors == []
            # every message answered 200 was stored for both upstreams, none delivered yet
            assert await relay.relay.outbox.backlog("seg") == total
            assert await relay.relay.outbox.backlog("june") == total
            assert upstream.accepted() == [] and june.accepted() == []
            await upstream.start()
            await june.start()
            got_seg = await upstream.wait_for(total, seconds=20)
            got_june = await june.wait_for(total, seconds=20)
    finally:
        await june.stop()
    for fake, got in ((upstream, got_seg), (june, got_june)):
        ids = [m["messageId"] for m in got]
        assert set(ids) == set(key_of)
        for user, expected in order.items():
            mine = [m["messageId"] for m in got if m.get("userId") == user]
            assert first_seen(mine) == expected, f"order of {user} on {fake.url}"
        for req in fake.requests:
            if 200 <= req.status < 300:
                keys = {key_of[m["messageId"]] for m in req.body["batch"]}
                assert keys == {base64.b64decode(req.headers["Authorization"][6:])
                                .decode().rstrip(":")}
    for req in upstream.requests:
        if 200 <= req.status < 300:
            assert {key_of[m["messageId"]] for m in req.body["batch"]} == {req.body["writeKey"]}


async def test_skewed_sdk_clock_is_corrected(upstream, write_config, start_relay):
    """A segment-analytics-python batch whose sentAt shows the client clock an hour fast arrives
    with timestamp = receivedAt - (sentAt - timestamp)."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    client_now = datetime.now(UTC) + timedelta(hours=1)  # the client's clock is 1 h fast
    event_at = client_now - timedelta(seconds=5)
    # send=False: the SDK builds the message exactly as usual but posts nothing by itself
    builder = SegmentClient(write_key=SEG_KEY, send=False)
    ok, msg = builder.track("u-skew", "Skewed", timestamp=event_at)
    assert ok
    sent_at = client_now.isoformat()
    async with start_relay(path) as relay:
        response = await asyncio.to_thread(
            segment_request.post, SEG_KEY, relay.url, timeout=5, batch=[msg], sentAt=sent_at)
        assert response.status_code == 200
        [got] = await upstream.wait_for(1)
    assert got["messageId"] == msg["messageId"]
    received = parse_time(got["receivedAt"])
    expected = received - (parse_time(sent_at) - parse_time(msg["timestamp"]))
    assert abs(parse_time(got["timestamp"]) - expected) <= SKEW_TOLERANCE
    assert abs(parse_time(got["timestamp"]) - (datetime.now(UTC) - timedelta(seconds=5))) \
        < timedelta(seconds=10)


async def test_skewed_browser_clock_is_corrected(upstream, write_config, start_relay):
    """An analytics.js-style single call with per-message sentAt an hour slow arrives with
    timestamp = receivedAt - (sentAt - timestamp)."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    client_now = datetime.now(UTC) - timedelta(hours=1)  # the browser's clock is 1 h slow
    body = {
        "type": "track", "event": "Clicked", "userId": "u-browser", "messageId": "ajs-skew-1",
        "timestamp": (client_now - timedelta(seconds=3)).isoformat(timespec="milliseconds"),
        "sentAt": client_now.isoformat(timespec="milliseconds"), "writeKey": "WKB",
        "context": {"library": {"name": "analytics.js", "version": "npm:next-1.84.3"}},
    }
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        async with http.post(relay.url + "/v1/t", json=body,
                             headers={"Authorization": basic("WKB")}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"success": True}
        [got] = await upstream.wait_for(1)
    assert got["messageId"] == "ajs-skew-1"
    assert "sentAt" not in got and "writeKey" not in got
    received = parse_time(got["receivedAt"])
    expected = received - (parse_time(body["sentAt"]) - parse_time(body["timestamp"]))
    assert abs(parse_time(got["timestamp"]) - expected) <= SKEW_TOLERANCE
    assert abs(parse_time(got["timestamp"]) - (datetime.now(UTC) - timedelta(seconds=3))) \
        < timedelta(seconds=10)
