"""Captured real SDK requests replayed against relay, and what the vendor then receives."""

from __future__ import annotations

import asyncio
import base64
import copy
import gzip
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import FIXTURES

Capture = dict[str, Any]
Message = dict[str, Any]

TYPES = ("identify", "track", "page", "screen", "group", "alias")
SHORT = {t[0]: t for t in TYPES}
BATCH_PATHS = frozenset({"/v1/batch", "/v1/import", "/sdk/batch", "/v1/b", "/sdk/b"})
# analytics.js (Segment's and June's browser builds); python/node server SDKs are not here
BROWSER_PATHS = frozenset(
    {f"/v1/{s}" for s in SHORT} | {"/v1/b", "/sdk/b"} | {f"/sdk/{t}" for t in TYPES}
)
NOT_REPLAYED = frozenset({"host", "content-length", "content-encoding"})
ENVELOPE = ("writeKey", "sentAt")
CLIENT_IP = "127.0.0.1"
SKEW_TOLERANCE = timedelta(milliseconds=2)
OK = (200, {"success": True})


def load(path: Path) -> list[Capture]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CAPTURE_FILES = sorted(FIXTURES.glob("*.jsonl"))
CAPTURES = {path.stem: load(path) for path in CAPTURE_FILES}


def files_with(predicate: Any) -> list[str]:
    return [name for name, caps in CAPTURES.items() if any(predicate(c) for c in caps)]


def is_batch(capture: Capture) -> bool:
    return capture["path"] in BATCH_PATHS


def path_type(path: str) -> str:
    """The message type a single-call path stands for: /v1/t -> track, /sdk/identify -> identify."""
    last = path.rsplit("/", 1)[1]
    return last if last in TYPES else SHORT[last]


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def capture_key(capture: Capture) -> str:
    """The write key the SDK sent: Basic user (`b64(key:)`), else the body's writeKey."""
    auth = capture["headers"].get("Authorization")
    if auth:
        return base64.b64decode(auth.split(" ", 1)[1]).decode().split(":", 1)[0]
    return str(capture["body"]["writeKey"])


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def expected_messages(capture: Capture, body: dict[str, Any] | None = None) -> list[
        tuple[Message, Message, Any]]:
    """(expected message minus timestamp/receivedAt, raw item, sentAt) for each item sent."""
    body = capture["body"] if body is None else body
    items = body["batch"] if is_batch(capture) else [body]
    out = []
    for item in items:
        message = {k: copy.deepcopy(v) for k, v in item.items() if k not in ENVELOPE}
        if is_batch(capture):
            for key in ("context", "integrations"):
                if isinstance(body.get(key), dict):
                    message[key] = {**body[key], **message.get(key, {})}
        else:
            message["type"] = path_type(capture["path"])
        if capture["path"] in BROWSER_PATHS:
            message.setdefault("context", {}).setdefault("ip", CLIENT_IP)
        message.pop("timestamp", None)
        out.append((message, item, item.get("sentAt", body.get("sentAt"))))
    return out


async def replay(http: aiohttp.ClientSession, base: str, capture: Capture,
                 body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """Sends `capture` (or its path and headers with `body`) as the SDK did; status and JSON."""
    headers = {k: v for k, v in capture["headers"].items() if k.lower() not in NOT_REPLAYED}
    raw = json.dumps(capture["body"] if body is None else body).encode()
    if capture["headers"].get("Content-Encoding") == "gzip" or \
            capture.get("aiohttp_auto_decompressed"):
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    async with http.post(base + capture["path"], data=raw, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def drained(relay: Any, upstream_name: str = "seg", seconds: float = 10.0) -> None:
    """Waits until relay holds nothing more for `upstream_name`: all sent and acknowledged."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := await relay.relay.outbox.backlog(upstream_name)) > 0:
        assert loop.time() < deadline, f"{left} message(s) still queued after {seconds}s"
        await asyncio.sleep(0.02)


def check_message(out: Message, expected: Message, item: Message, sent_at: Any) -> None:
    """One forwarded message against what relay must make of the captured item."""
    assert {k: v for k, v in out.items() if k not in ("receivedAt", "timestamp")} == expected
    for field in ENVELOPE:
        assert field not in out
    received = parse_time(out["receivedAt"])
    assert abs(received - datetime.now(UTC)) < timedelta(seconds=30)
    if "timestamp" not in item:
        assert out["timestamp"] == out["receivedAt"]
    else:
        skew = parse_time(sent_at) - parse_time(item["timestamp"])
        assert abs(parse_time(out["timestamp"]) - (received - skew)) <= SKEW_TOLERANCE


@pytest.mark.parametrize("name", sorted(CAPTURES))
async def test_capture_replay(name, upstream, write_config, start_relay):
    """Each captured request is answered 200 and the vendor gets exactly its messages, normalised
    (type from path, ids kept, envelope removed, receivedAt, context.ip only from browsers)."""
    captures = CAPTURES[name]
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    expected = []  # (capture, expected message, item, sentAt) in the order sent
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        for capture in captures:
            assert await replay(http, relay.url, capture) == OK, capture["path"]
            expected += [(capture, *e) for e in expected_messages(capture)]
        await upstream.wait_for(len(expected))
        await drained(relay)
    got = upstream.accepted()
    ids = [m["messageId"] for m in got]
    assert Counter(ids) == Counter(e[1]["messageId"] for e in expected)
    assert all(n == 1 for n in Counter(ids).values())
    by_id = {m["messageId"]: m for m in got}
    for capture, message, item, sent_at in expected:
        out = by_id[message["messageId"]]
        check_message(out, message, item, sent_at)
        if not is_batch(capture):
            assert out["type"] == path_type(capture["path"])
        if capture["path"] in BROWSER_PATHS:
            assert out["context"]["ip"] == CLIENT_IP
            assert out["context"]["library"]["name"] == "analytics.js"
        else:
            assert "ip" not in out.get("context", {})
    # each batch carries the write key of the capture its messages came from
    key_of = {e[1]["messageId"]: capture_key(e[0]) for e in expected}
    for req in upstream.requests:
        assert req.path == "/v1/batch"
        keys = {key_of[m["messageId"]] for m in req.body["batch"]}
        assert keys == {req.body["writeKey"]}
        assert req.headers["Authorization"] == basic(req.body["writeKey"])
    # per user, the order the SDK sent
    users = {m.get("userId") or m.get("anonymousId") for _, m, _, _ in expected}
    for user in users:
        sent = [m["messageId"] for _, m, _, _ in expected
                if (m.get("userId") or m.get("anonymousId")) == user]
        assert [i for i in ids if i in set(sent)] == sent


@pytest.mark.parametrize("name", files_with(is_batch))
async def test_batch_level_context_merges(name, upstream, write_config, start_relay):
    """Batch captures given a top-level context and integrations arrive with them merged into
    every item, the item's own keys winning."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    shared_context = {"batchLevel": "yes", "groupId": "g-top", "library": {"name": "top"}}
    shared_integrations = {"All": False, "Batch Only": True}
    expected = []
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        for capture in filter(is_batch, CAPTURES[name]):
            body = {**copy.deepcopy(capture["body"]), "context": shared_context,
                    "integrations": shared_integrations}
            assert await replay(http, relay.url, capture, body) == OK
            expected += expected_messages(capture, body)
        await upstream.wait_for(len(expected))
        await drained(relay)
    by_id = {m["messageId"]: m for m in upstream.accepted()}
    assert len(upstream.accepted()) == len(expected) == len(by_id)
    for message, item, sent_at in expected:
        out = by_id[message["messageId"]]
        check_message(out, message, item, sent_at)
        own = item.get("context", {})
        assert out["context"]["batchLevel"] == "yes"
        assert out["context"]["groupId"] == own.get("groupId", "g-top")
        assert out["context"]["library"] == own.get("library", {"name": "top"})
        assert out["integrations"]["Batch Only"] is True
        assert out["integrations"]["All"] == item.get("integrations", {}).get("All", False)


@pytest.mark.parametrize("name", files_with(lambda c: not is_batch(c)))
async def test_single_call_type_comes_from_path(name, upstream, write_config, start_relay):
    """Single-call captures with their `type` field removed still arrive typed from the path."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    want: dict[str, str] = {}
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        for capture in CAPTURES[name]:
            if is_batch(capture):
                continue
            body = {k: v for k, v in capture["body"].items() if k != "type"}
            assert await replay(http, relay.url, capture, body) == OK
            want[body["messageId"]] = path_type(capture["path"])
        await upstream.wait_for(len(want))
        await drained(relay)
    got = {m["messageId"]: m["type"] for m in upstream.accepted()}
    assert got == want
    assert len(upstream.accepted()) == len(want)


METRICS = {"series": [{"type": "Counter", "metric": "analytics_js.invoke.track", "value": 1,
                       "tags": {"library": "analytics.js", "library_version": "npm:next-1.84.3"}}]}


async def test_metrics_are_answered_and_never_forwarded(upstream, write_config, start_relay):
    """analytics.js metrics posts to /v1/m and /sdk/m get 200 and never reach the vendor."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    text = {"Content-Type": "text/plain"}
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        for route in ("/v1/m", "/sdk/m"):
            async with http.post(relay.url + route, data=json.dumps(METRICS), headers=text) as r:
                assert (r.status, await r.json()) == OK
        sentinel = {"type": "track", "event": "After", "userId": "u", "messageId": "sentinel-1"}
        async with http.post(relay.url + "/v1/track", json=sentinel,
                             headers={"Authorization": basic("WK")}) as r:
            assert (r.status, await r.json()) == OK
        await upstream.wait_for(1)
        await drained(relay)
    assert upstream.accepted_ids() == ["sentinel-1"]
    assert len(upstream.requests) == 1
