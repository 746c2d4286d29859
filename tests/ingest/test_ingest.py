"""Inbound HTTP: answers, limits, auth, and what is (not) stored, against a running relay."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from relay.ingest import segment

OK = {"success": True}


def stored(db: Path, table: str = "outbox") -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def drained(db: Path, seconds: float = 5.0) -> int:
    """Waits for the outbox to empty (acks commit just after the vendor answers)."""
    for _ in range(int(seconds / 0.05)):
        if stored(db) == 0:
            break
        await asyncio.sleep(0.05)
    return stored(db)


def counters(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT name, count FROM counters").fetchall())


def basic(text: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


@pytest.fixture
def config_path(upstream, write_config):
    return write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])


@pytest.fixture
async def running(config_path, start_relay):
    async with start_relay(config_path) as relay, aiohttp.ClientSession() as http:
        yield relay, http


async def post(http, url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers=headers or {}) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_answer_is_exactly_success_json(running):
    """A stored message is answered 200 {"success": true} as JSON."""
    relay, http = running
    status, body, headers = await post(http, relay.url + "/v1/track", {"userId": "u", "event": "E"})
    assert (status, body) == (200, OK)
    assert headers["Content-Type"].startswith("application/json")


async def test_text_plain_body_is_json(running, upstream):
    """analytics.js sends JSON as text/plain; it is parsed all the same."""
    relay, http = running
    body = json.dumps({"userId": "u", "event": "E", "messageId": "tp-1"}).encode()
    status, _, _ = await post(http, relay.url + "/v1/t", body, {"Content-Type": "text/plain"})
    assert status == 200
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["tp-1"]


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/track", b"not json", "invalid_json"),
        ("/v1/track", b"[1, 2]", "invalid_payload"),
        ("/v1/batch", b'{"batch": "x"}', "invalid_batch"),
        ("/v1/batch", b'{"batch": [1]}', "invalid_batch"),
        ("/sdk/batch", b'{"nobatch": []}', "invalid_batch"),
        ("/v1/track", b'{"userId": "u", "event": "E", "n": NaN}', "invalid_json"),
    ],
)
async def test_bad_payload_is_400_and_stores_nothing(running, config_path, path, body, code):
    """Bodies that are not a payload get 400 {"code","message"} and leave storage untouched."""
    relay, http = running
    status, answer, _ = await post(http, relay.url + path, body)
    assert status == 400
    assert answer["code"] == code and answer["message"]
    assert stored(relay.config.storage.path) == 0


async def test_size_limits_are_413(running):
    """Over 32 KB per message or 500 KB per request, also once decompressed, is refused."""
    relay, http = running
    big = "x" * (segment.MAX_MESSAGE_BYTES + 1)
    single = {"userId": "u", "event": "E", "properties": {"p": big}}
    in_batch = {"batch": [{"type": "track", "userId": "u", "event": "E"},
                          {"type": "track", "userId": "u", "event": "E", "properties": {"p": big}}]}
    request = {"batch": [{"type": "track", "userId": "u", "event": "E",
                          "properties": {"p": "y" * 30000}}] * 18}
    bomb = gzip.compress(b" " * (segment.MAX_REQUEST_BYTES + 10) + b"{}")
    for path, body, headers in (
        ("/v1/track", single, None),
        ("/v1/batch", in_batch, None),
        ("/v1/batch", request, None),
        ("/v1/batch", bomb, {"Content-Encoding": "gzip"}),
    ):
        status, answer, _ = await post(http, relay.url + path, body, headers)
        assert status == 413, (path, answer)
        assert answer["code"] in ("message_too_large", "request_too_large")
    assert stored(relay.config.storage.path) == 0


async def test_gzip_body_accepted_and_invalid_gzip_refused(running, upstream):
    """A gzip body is decompressed and stored; bytes that are not gzip are a 400."""
    relay, http = running
    body = gzip.compress(json.dumps({"userId": "u", "event": "Z", "messageId": "gz-1"}).encode())
    status, _, _ = await post(http, relay.url + "/v1/track", body, {"Content-Encoding": "gzip"})
    assert status == 200
    status, answer, _ = await post(http, relay.url + "/v1/track", b"\x00not gzip at all",
                                   {"Content-Encoding": "gzip"})
    assert status == 400 and answer["code"] == "invalid_body"
    got = await upstream.wait_for(1)
    assert [m["messageId"] for m in got] == ["gz-1"]
    assert "Content-Encoding" not in upstream.requests[0].headers


async def test_metrics_paths_are_answered_not_forwarded(running):
    """/v1/m and /sdk/m answer 200 and store nothing."""
    relay, http = running
    for path in ("/v1/m", "/sdk/m"):
        status, body, _ = await post(http, relay.url + path, {"series": [{"type": "Counter"}]})
        assert (status, body) == (200, OK)
    assert stored(relay.config.storage.path) == 0


async def test_invalid_messages_are_answered_200_counted_not_forwarded(running, upstream):
    """Messages the vendor would drop get 200 like the vendor gives, are counted, not sent."""
    relay, http = running
    batch = {"batch": [
        {"type": "track", "userId": "u", "event": "ok", "messageId": "keep"},
        {"type": "track", "event": "no id"},
        {"type": "track", "userId": "u"},
        {"type": "group", "userId": "u"},
        {"type": "alias", "userId": "u"},
        {"type": "bogus", "userId": "u"},
    ]}
    status, body, _ = await post(http, relay.url + "/v1/batch", batch)
    assert (status, body) == (200, OK)
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["keep"]
    assert counters(relay.config.storage.path) == {
        "invalid.no_user_anon_id": 1, "invalid.track_without_event": 1,
        "invalid.group_without_group_id": 1, "invalid.alias_without_ids": 1,
        "invalid.invalid_type": 1,
    }


async def test_write_keys_refuse_others_with_401(upstream, write_config, start_relay):
    """With write_keys set, a listed key in any form is accepted; any other gets 401."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        write_keys=["GOOD"])
    msg = {"userId": "u", "event": "E"}
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        url = relay.url + "/v1/track"
        for headers, body in (
            (basic("GOOD:"), msg), (basic("GOOD"), msg), ({"Authorization": "Basic GOOD"}, msg),
            ({}, {**msg, "writeKey": "GOOD"}),
        ):
            assert (await post(http, url, body, headers))[0] == 200
        for headers, body in ((basic("BAD:"), msg), ({}, msg), ({}, {**msg, "writeKey": "BAD"})):
            status, answer, _ = await post(http, url, body, headers)
            assert status == 401 and answer["code"] == "invalid_write_key"
        await upstream.wait_for(4)
        assert await drained(relay.config.storage.path) == 0
    assert len(upstream.accepted()) == 4


async def test_direct_context_gets_caller_ip(running, upstream):
    """context.direct: true asks for the caller's address, as the HTTP API documents."""
    relay, http = running
    await post(http, relay.url + "/v1/track",
               {"userId": "u", "event": "E", "context": {"direct": True}})
    await post(http, relay.url + "/v1/track", {"userId": "u", "event": "F"})
    first, second = await upstream.wait_for(2)
    assert first["context"]["ip"] == "127.0.0.1"
    assert "ip" not in second.get("context", {})


async def test_concurrent_requests_share_commits(running, upstream):
    """Group commit: many concurrent requests are stored in fewer transactions than requests."""
    relay, http = running
    before = relay.relay.outbox.commits
    results = await asyncio.gather(*(
        post(http, relay.url + "/v1/track", {"userId": f"u{i}", "event": "E"}) for i in range(200)
    ))
    assert all(r[0] == 200 for r in results)
    assert relay.relay.outbox.commits - before < 200
    await upstream.wait_for(200)


async def test_counts_of_requests_sharing_a_commit_add_up(running, upstream):
    """Counters written by requests that share a commit add up: 100 concurrent batches, each
    with one message the vendor would drop, count 100 drops, and their 100 valid messages
    arrive."""
    relay, http = running
    before = relay.relay.outbox.commits
    body = {"batch": [{"type": "track", "userId": "u"},
                      {"type": "track", "userId": "u", "event": "E"}]}
    results = await asyncio.gather(*(
        post(http, relay.url + "/v1/batch", body) for _ in range(100)))
    assert all(r[0] == 200 for r in results)
    assert relay.relay.outbox.commits - before < 100
    invalid = {k: n for k, n in counters(relay.config.storage.path).items()
               if k.startswith("invalid.")}
    assert invalid == {"invalid.track_without_event": 100}
    await upstream.wait_for(100)


async def test_health_and_readiness(running):
    """/healthz answers alive; /readyz reports storage writable and forwarders running."""
    relay, http = running
    async with http.get(relay.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(relay.url + "/readyz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ready": True, "storage": True, "forwarders": True}


async def test_storage_that_cannot_write_is_503_then_recovers(running, upstream):
    """A database locked by another writer gives 503 with Retry-After; once free, 200 again."""
    relay, http = running
    blocker = sqlite3.connect(relay.config.storage.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        status, answer, headers = await post(http, relay.url + "/v1/track",
                                             {"userId": "u", "event": "lost?"})
        assert status == 503 and answer["code"] == "storage_unavailable"
        assert headers["Retry-After"] == "5"
        async with http.get(relay.url + "/readyz") as resp:
            assert resp.status == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    status, _, _ = await post(http, relay.url + "/v1/track",
                              {"userId": "u", "event": "kept", "messageId": "after"})
    assert status == 200
    got = await upstream.wait_for(1)
    assert [m["messageId"] for m in got] == ["after"]
    async with http.get(relay.url + "/readyz") as resp:
        assert resp.status == 200


async def test_lone_surrogates_are_stored_or_refused_never_fatal(running, upstream):
    """JSON may escape lone surrogates; in ids they are stored, in a write key refused with 400."""
    relay, http = running
    body = b'{"userId": "\\ud800u", "event": "E", "messageId": "sur-1"}'
    assert (await post(http, relay.url + "/v1/track", body))[0] == 200
    body = b'{"userId": "u", "event": "E", "writeKey": "\\udfff"}'
    status, answer, _ = await post(http, relay.url + "/v1/track", body)
    assert status == 400 and answer["code"] == "invalid_write_key"
    got = await upstream.wait_for(1)
    assert [m["messageId"] for m in got] == ["sur-1"]
    assert got[0]["userId"] == "\ud800u"


async def test_deep_nesting_is_refused(running):
    """A payload nested thousands deep is a 400, not a crash."""
    relay, http = running
    deep = b'{"userId": "u", "event": "E", "properties": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    status, answer, _ = await post(http, relay.url + "/v1/track", deep)
    assert status == 400 and answer["code"] in ("invalid_json", "too_deeply_nested")
    assert stored(relay.config.storage.path) == 0


async def test_a_request_with_more_users_than_the_cache_holds_sees_all_their_state(
        upstream, write_config, start_relay):
    """With `storage.cache_size: 2`, a batch of 40 users' messages is ruled on the state loaded
    for all of them: the staff member identified earlier (now out of the cache) is dropped in
    the middle of it, and each grouped customer's track gets their group, read back from the
    file."""
    rules = [{"type": "one_group_per_user"},
             {"type": "drop_internal_users", "email_domains": ["acme.io"]}]
    cfg = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}], rules=rules)
    text = cfg.read_text().replace("synchronous: normal", "synchronous: normal\n  cache_size: 2")
    cfg.write_text(text)
    async with start_relay(cfg) as relay, aiohttp.ClientSession() as http:
        url = relay.url + "/v1/batch"
        first = [{"type": "identify", "userId": "staff", "traits": {"email": "s@acme.io"}}]
        first += [{"type": "group", "userId": f"u{n}", "groupId": f"g{n}"} for n in range(20)]
        assert (await post(http, url, {"batch": first}))[0] == 200
        second = [{"type": "track", "userId": f"u{n}", "event": "E"} for n in range(20)]
        second.insert(10, {"type": "track", "userId": "staff", "event": "E"})
        second += [{"type": "track", "userId": f"new{n}", "event": "E"} for n in range(20)]
        assert (await post(http, url, {"batch": second}))[0] == 200
        got = await upstream.wait_for(60)
    tracks = [m for m in got if m["type"] == "track"]
    assert [m["userId"] for m in tracks] == [f"u{n}" for n in range(20)] + [
        f"new{n}" for n in range(20)]
    assert [m.get("context", {}).get("groupId") for m in tracks[:20]] == [
        f"g{n}" for n in range(20)]
    assert all("groupId" not in m.get("context", {}) for m in tracks[20:])
    assert len(relay.relay.state._groups) <= 2  # back within its size once the rules are done
