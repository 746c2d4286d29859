"""Security, beyond tests/ingest/test_ingest.py (write keys answered 401),
tests/ops/test_operations.py (admin token; no secret in logs, refusals or /admin answers) and
tests/system/test_container.py (a non-root USER): nothing stored for a refused key, no header
or body field redirects relay's traffic (no SSRF), and no secret in `relay try` output or
/metrics."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream
from processes import clean_env

UPSTREAM_KEY = "SECRET-KEY-1234567890"
ADMIN_TOKEN = "ADMIN-TOKEN-0123456789abcdef"
HASH_KEY = "HASH-KEY-fedcba9876543210"
SECRETS = (UPSTREAM_KEY, ADMIN_TOKEN, HASH_KEY)


def basic(key: str) -> dict[str, str]:
    """The Authorization header the SDKs send for `key`."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def rows(db: str) -> int:
    """Messages in the outbox table."""
    with sqlite3.connect(db) as conn:
        count: int = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return count


@pytest.fixture
async def attacker() -> Any:
    """A second fake server that must never receive anything from relay."""
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


async def test_refused_write_key_stores_nothing(upstream, write_config, start_relay):
    """With write_keys set and the upstream down (so nothing leaves the outbox), requests with
    any other key, in any form, add no row; one with a listed key adds its messages."""
    await upstream.stop()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        write_keys=["GOOD"])
    bare = {"batch": [{"type": "track", "userId": "u", "event": "E"}]}
    batch = {"batch": [{**bare["batch"][0], "writeKey": "GOOD"}]}
    async with start_relay(path) as running, aiohttp.ClientSession() as http:
        for headers, body in (
            (basic("BAD"), batch), ({"Authorization": "Basic !!!"}, batch),
            ({"Authorization": "Bearer GOOD"}, bare), ({}, {**bare, "writeKey": "GOO"}),
            (basic("GOOD\x00"), batch), (basic("x" * 10_000), batch),
        ):
            async with http.post(running.url + "/v1/batch", json=body, headers=headers) as resp:
                # a key over 256 characters is not a key at all: 400, not 401
                expected = 400 if len(headers.get("Authorization", "")) > 8190 else 401
                assert resp.status == expected, (headers, await resp.text())
        assert rows(running.config.storage.path) == 0
        async with http.post(running.url + "/v1/batch", json=batch, headers=basic("GOOD")) as r:
            assert r.status == 200
        assert rows(running.config.storage.path) == 1


ODD_KEYS = ["k@127.0.0.1:1", "k/../../v1", "k\r\nHost: evil", "http://evil/", "k%0d%0aX: y"]


async def test_no_header_or_body_field_redirects_relay_traffic(
        upstream, attacker, write_config, start_relay):
    """Host, X-Forwarded-Host, Forwarded, url/host/endpoint fields and write keys naming the
    attacker's server change nothing: only the configured upstream receives, on its path."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    evil = attacker.url.removeprefix("http://")
    headers = {"Host": evil, "X-Forwarded-Host": evil, "X-Forwarded-Proto": "http",
               "Forwarded": f"host={evil};proto=http", "X-Original-URL": attacker.url,
               "Referer": attacker.url, "Origin": attacker.url}
    fields = {"url": attacker.url, "host": evil, "endpoint": attacker.url, "apiHost": evil,
              "context": {"page": {"url": attacker.url}, "apiHost": evil}}
    sent = 0
    async with start_relay(path) as running, aiohttp.ClientSession() as http:
        for n, key in enumerate([*ODD_KEYS, attacker.url]):
            body = {"batch": [{"type": "track", "userId": "u", "event": "E",
                               "messageId": f"ssrf-{n}", **fields}],
                    "writeKey": key, **fields}
            async with http.post(running.url + "/v1/batch", json=body,
                                 headers={**headers, **basic(key)}) as resp:
                assert resp.status == 200, await resp.text()
                sent += 1
        got = await upstream.wait_for(sent)
    assert attacker.requests == []
    assert len(got) == sent
    assert {r.path for r in upstream.requests} == {"/v1/batch"}
    assert {r.headers["Host"] for r in upstream.requests} == {upstream.url[len("http://"):]}


def test_relay_try_output_shows_no_secret(write_config, tmp_path, upstream: FakeUpstream):
    """`relay try` with an upstream write key, an admin token and a hash rule prints the rules'
    effects, and none of the three secrets, on stdout or stderr."""
    path = write_config(
        [{"name": "seg", "kind": "segment", "url": upstream.url, "write_key": UPSTREAM_KEY}],
        admin={"token": ADMIN_TOKEN},
        rules=[{"type": "hash", "paths": ["traits.email"], "key_env": "RELAY_HASH_KEY"}])
    payload = tmp_path / "payload.json"
    payload.write_text('{"type": "identify", "userId": "u", "traits": {"email": "a@b.c"}}')
    env = {**clean_env(), "RELAY_HASH_KEY": HASH_KEY}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "try", "--config", str(path), str(payload)],
        capture_output=True, text=True, timeout=30, env=env, cwd=str(tmp_path), check=False)
    assert result.returncode == 0, result.stderr
    assert "traits.email" in result.stdout
    output = result.stdout + result.stderr
    assert [s for s in SECRETS if s in output] == [], output


async def test_metrics_and_errors_show_no_secret(upstream, write_config, start_relay):
    """/metrics and the answers to a refused, a malformed and an unknown request hold none of
    the upstream key, admin token or hash key."""
    path = write_config(
        [{"name": "seg", "kind": "segment", "url": upstream.url, "write_key": UPSTREAM_KEY}],
        admin={"token": ADMIN_TOKEN}, write_keys=["GOOD"])
    texts = []
    async with start_relay(path) as running, aiohttp.ClientSession() as http:
        for method, route, body, headers in (
            ("GET", "/metrics", None, {}),
            ("POST", "/v1/track", b'{"userId": "u"', basic("GOOD")),
            ("POST", "/v1/track", b'{"userId": "u", "event": "E"}', basic(UPSTREAM_KEY)),
            ("GET", "/admin/queue", None, {"Authorization": "Bearer " + ADMIN_TOKEN[:-1]}),
            ("POST", "/nowhere", b"{}", {}),
        ):
            async with http.request(method, running.url + route, data=body,
                                    headers=headers) as resp:
                texts.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")
    assert [[s for s in SECRETS if s in t] for t in texts] == [[]] * len(texts), texts

