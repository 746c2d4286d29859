"""The tap: `/admin/tap` against relay served on 127.0.0.1, its hub's bounds, and `relay tap`."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream
from processes import clean_env

from relay.ops import tap_client
from relay.tap import hub, records
from relay.tap.hub import Filters, Tap

TOKEN = "tap-token-0123456789"
WRITE_KEY = "WK_tap_secret_key"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HASH_KEY = "a-hash-key-of-32-characters-here"
RULES = [{"type": "one_group_per_user", "inject_into": ["track"]},
         {"type": "drop_internal_users", "email_domains": ["example.com"]},
         {"type": "hash", "paths": ["traits.phone"]}]
Event = tuple[str, dict[str, Any]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test's own requests."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        yield session


@pytest.fixture
def tap_config(write_config, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config with the admin token, the B2B rules and a hash of traits.phone."""
    monkeypatch.setenv("RELAY_HASH_KEY", HASH_KEY)
    return write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        admin={"token": TOKEN}, rules=RULES)


class Stream:
    """One open /admin/tap stream, read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, seconds: float = 5.0) -> Event:
        kind, data = "message", ""
        while True:
            line = (await asyncio.wait_for(self.response.content.readline(), seconds)).decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                return kind, json.loads(data)

    async def until(self, kind: str, seconds: float = 5.0, **fields: Any) -> dict[str, Any]:
        """The next event of `kind` whose data has `fields`; others are passed over."""
        while True:
            got_kind, data = await self.next(seconds)
            if got_kind == kind and all(data.get(k) == v for k, v in fields.items()):
                return data


async def open_stream(http: aiohttp.ClientSession, url: str, **query: str) -> Stream:
    response = await http.get(url + "/admin/tap", params=query, headers=BEARER,
                              timeout=aiohttp.ClientTimeout(total=None))
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    stream = Stream(response)
    assert (await stream.next())[0] == "sampling"  # every stream says its share first
    return stream


async def viewers(http: aiohttp.ClientSession, url: str) -> int:
    """relay_tap_viewers, from relay's /metrics."""
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("relay_tap_viewers "))))


async def post(http: aiohttp.ClientSession, url: str, path: str, body: Any) -> int:
    async with http.post(url + path, json=body, headers=BASIC) as response:
        return response.status


async def test_the_stream_shows_each_outcome_with_its_rule_and_its_delivery(
        tap_config, start_relay, http, upstream):
    """A staff user's event is shown dropped by drop_internal_users with its rule id; a
    multi-company user's track shows context.groupId added by one_group_per_user, before and
    after, then delivered to the upstream; an invalid message and a refused request are shown;
    the write key is masked."""
    async with start_relay(tap_config) as running:
        stream = await open_stream(http, running.url)
        assert await post(http, running.url, "/v1/batch", {"batch": [
            {"type": "identify", "userId": "staff-1", "traits": {"email": "ann@example.com"}},
            {"type": "group", "userId": "u1", "groupId": "acme"},
            {"type": "group", "userId": "u1", "groupId": "globex"},
            {"type": "track", "userId": "u1", "event": "Report Built", "messageId": "t-1"},
            {"type": "track", "event": "No One"}]}) == 200
        assert await post(http, running.url, "/v1/track", [1]) == 400
        seen: list[Event] = []
        while not (seen and seen[-1][0] == "delivery"):
            seen.append(await stream.next())
        messages = {data["user"]: data for kind, data in seen if kind == "message"}
        staff = messages["staff-1"]
        assert (staff["outcome"], staff["rule"], staff["after"]) == (
            "dropped", "drop_internal_users#1", None)
        track = next(data for kind, data in seen if data.get("message_id") == "t-1")
        assert track["outcome"] == "forwarded"
        assert "context" not in track["before"]
        assert track["after"]["context"]["groupId"] == "globex"
        assert track["changes"] == [{"rule": "one_group_per_user#0",
                                     "paths": ["context.groupId"]}]
        assert track["write_key"] == "WK_t…"
        invalid = messages[None]
        assert (invalid["outcome"], invalid["event"]) == ("invalid", "No One")
        assert invalid["reason"]
        refused = next(data for kind, data in seen if kind == "refused")
        assert (refused["status"], refused["route"]) == (400, "/v1/track")
        delivered = await stream.until("delivery", message_id="t-1")
        assert (delivered["upstream"], delivered["outcome"], delivered["status"]) == (
            "seg", "delivered", 200)
        stream.response.close()


async def test_filters_show_only_what_they_name(tap_config, start_relay, http):
    """user, type, event glob and outcome each narrow the stream; a filter relay does not know
    is a 400 {"code","message"}."""
    async with start_relay(tap_config) as running:
        by_user = await open_stream(http, running.url, user="u2")
        by_event = await open_stream(http, running.url, event="Report *", type="track")
        by_outcome = await open_stream(http, running.url, outcome="dropped")
        assert await post(http, running.url, "/v1/batch", {"batch": [
            {"type": "track", "userId": "u1", "event": "Report Built"},
            {"type": "track", "userId": "u2", "event": "Signed In"},
            {"type": "page", "userId": "u2", "name": "Report Home"},
            {"type": "identify", "userId": "s", "traits": {"email": "s@example.com"}}]}) == 200
        assert [(await by_user.until("message"))["type"] for _ in range(2)] == ["track", "page"]
        assert (await by_event.until("message"))["user"] == "u1"
        assert (await by_outcome.until("message"))["user"] == "s"
        assert await post(http, running.url, "/v1/track", {"userId": "u1", "event": "X"}) == 200
        with pytest.raises(TimeoutError):
            await by_user.until("message", seconds=0.5)  # u1's track is not u2's
        async with http.get(running.url + "/admin/tap", params={"outcome": "lost"},
                            headers=BEARER) as response:
            assert response.status == 400
            assert set(await response.json()) == {"code", "message"}


async def test_values_a_hash_rule_replaced_are_never_shown_in_clear(tap_config, start_relay,
                                                                    http):
    """A phone number the hash rule replaces is shown hashed in the message as received too,
    and its clear value appears nowhere in the stream."""
    async with start_relay(tap_config) as running:
        stream = await open_stream(http, running.url)
        assert await post(http, running.url, "/v1/identify", {
            "userId": "u9", "traits": {"phone": "+1 555 0100", "name": "Nine"}}) == 200
        shown = await stream.until("message", user="u9")
        assert shown["before"]["traits"]["phone"] == shown["after"]["traits"]["phone"]
        assert len(shown["after"]["traits"]["phone"]) == 64
        assert "555 0100" not in json.dumps(shown)
        assert shown["changes"] == [{"rule": "hash#2", "paths": ["traits.phone"]}]


async def test_without_the_token_every_part_is_401_and_404_when_admin_is_off(
        tap_config, write_config, upstream, start_relay, http):
    """The stream answers 401 to a missing or wrong token; with admin.token empty the stream
    and the page are 404. The page's files carry a CSP that allows no inline script."""
    async with start_relay(tap_config) as running:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}x"},
                        {"Authorization": f"Basic {TOKEN}"}):
            async with http.get(running.url + "/admin/tap", headers=headers) as response:
                assert response.status == 401
                assert set(await response.json()) == {"code", "message"}
        for page in ("/debugger", "/debugger/debugger.js", "/debugger/debugger.css"):
            async with http.get(running.url + page) as response:
                assert response.status == 200, page
                policy = response.headers["Content-Security-Policy"]
                assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        async with http.get(running.url + "/debugger/..%2Frecords.py") as response:
            assert response.status == 404
    off = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with start_relay(off) as running:
        for route in ("/admin/tap", "/debugger", "/debugger/debugger.js"):
            async with http.get(running.url + route, headers=BEARER) as response:
                assert response.status == 404, route


async def test_ten_viewers_that_do_not_read_are_dropped_and_hold_bounded_memory(
        tap_config, start_relay, http):
    """Ten viewers that never read: each is dropped once its queue would pass VIEWER_BYTES,
    nothing queued for them passes that bound, the ring stays within its own, every request
    meanwhile is answered 200, and relay closes their connections."""
    async with start_relay(tap_config) as running:
        tap = running.relay.tap
        port = running.listener.port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        try:
            for sock in silent:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(f"GET /admin/tap HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             f"{TOKEN}\r\n\r\n".encode())
            for _ in range(100):
                if len(tap.viewers) == 10:
                    break
                await asyncio.sleep(0.05)
            assert len(tap.viewers) == 10
            # Events of ~30 KB (before and after): at the 50 a second sampling lets through,
            # each viewer is sent ~1.5 MB a second, past its 1 MB and any socket buffer soon.
            padding = "x" * 15_000
            statuses = []
            for round_ in range(400):
                if not tap.viewers:
                    break
                statuses.append(await post(http, running.url, "/v1/batch", {"batch": [
                    {"type": "track", "userId": f"u{round_}-{n}", "event": "Load",
                     "properties": {"pad": padding}} for n in range(10)]}))
                assert all(v.size <= hub.VIEWER_BYTES for v in tap.viewers)
                assert sum(len(chunk) for _, chunk in tap._ring) <= hub.RING_BYTES
                await asyncio.sleep(0.02)
            assert set(statuses) == {200}
            assert not tap.viewers, "viewers that do not read were kept"
            assert not tap.watching
            for _ in range(100):  # and their connections are closed, not left to the kernel
                if tap.open == 0:
                    break
                await asyncio.sleep(0.05)
            assert tap.open == 0
            for sock in silent:
                assert await asyncio.to_thread(closed_by_relay, sock)
        finally:
            for sock in silent:
                sock.close()


def closed_by_relay(sock: socket.socket) -> bool:
    """Whether relay ended this connection: reading what is left ends in EOF or a reset."""
    sock.settimeout(5.0)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_sampling_shows_an_even_share_above_the_readable_rate_and_says_so():
    """At most MAX_PER_SECOND messages are traced in any second; above that rate the next
    second shows that share of them, evenly, tells viewers the share, and shows everything
    again once the rate drops."""
    now = [100.0]
    tap = Tap(clock=lambda: now[0])
    viewer = tap.join(Filters())
    assert viewer is not None
    viewer.take()
    message = {"type": "track", "userId": "u", "event": "E"}
    rate = hub.MAX_PER_SECOND * 4
    # The first second of a burst, before its rate is known: the first MAX_PER_SECOND only.
    assert [tap.sample(message) for _ in range(rate)] == (
        [True] * hub.MAX_PER_SECOND + [False] * (rate - hub.MAX_PER_SECOND))
    now[0] += 1
    shown = sum(tap.sample(message) for _ in range(rate))
    assert shown == hub.MAX_PER_SECOND
    said = [json.loads(event.split(b"data: ")[1]) for event in viewer.take().split(b"\n\n")
            if b"event: sampling" in event]
    assert said[-1]["share"] == 0.25 and said[-1]["rate"] == rate
    now[0] += 5
    assert tap.sample(message) and tap.share == 1.0
    assert tap.sample({"type": "track", "userId": "other"})  # no filter: every user wanted
    picky = Tap()
    assert picky.join(Filters(user="someone")) is not None
    assert not picky.sample(message)  # no viewer wants it: not traced at all


def test_changed_paths_name_the_leaves_that_changed():
    """Paths are dotted, name each added leaf (context.groupId, not context), and the removed
    and changed ones."""
    before = {"a": 1, "b": {"c": 2, "d": 3}, "gone": {"x": 1}}
    after = {"a": 1, "b": {"c": 5, "d": 3}, "context": {"groupId": "g", "n": {"m": 1}}}
    assert records.changed_paths(before, after) == [
        "b.c", "gone.x", "context.groupId", "context.n.m"]
    assert records.changed_paths(before, before) == []


async def test_nobody_watching_builds_nothing(tap_config, start_relay, http):
    """With no viewer, ingest keeps nothing for the tap: after traffic its ring and its list
    of shown messages are empty, and a viewer that comes later sees none of it."""
    async with start_relay(tap_config) as running:
        tap = running.relay.tap
        assert await post(http, running.url, "/v1/track", {"userId": "u", "event": "E"}) == 200
        assert not tap.watching and not tap._ring and not tap._shown
        stream = await open_stream(http, running.url)
        with pytest.raises(TimeoutError):
            await stream.until("message", seconds=0.5)


async def test_relay_tap_prints_a_line_per_message_and_stops_after_limit(spawn_relay, upstream):
    """`relay tap --user u2 --limit 1` beside a running relay prints u2's message as one line
    with its outcome, and exits 0; with --json it prints the event as JSON."""
    relay = await spawn_relay([{"name": "seg", "kind": "segment", "url": upstream.url}],
                              admin={"token": TOKEN}, rules=RULES[:2])
    command = [sys.executable, "-m", "relay", "tap", "--config", str(relay.config_path),
               "--user", "u2", "--limit", "1"]
    taps: list[asyncio.subprocess.Process] = []
    try:
        for each in (command, [*command, "--json"]):
            taps.append(await asyncio.create_subprocess_exec(
                *each, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=clean_env()))
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                if await viewers(http, relay.url) == 2:
                    break
                await asyncio.sleep(0.1)
            for body in ({"userId": "u1", "event": "Skipped"},
                         {"userId": "u2", "event": "Report Built"}):
                assert await post(http, relay.url, "/v1/track", body) == 200
        out, err = await asyncio.wait_for(taps[0].communicate(), 10)
        assert taps[0].returncode == 0, err
        assert "Report Built" in out.decode() and "u2" in out.decode()
        assert "forwarded" in out.decode() and "Skipped" not in out.decode()
        out, err = await asyncio.wait_for(taps[1].communicate(), 10)
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert lines[-1]["kind"] == "message" and lines[-1]["event"] == "Report Built"
    finally:
        for each in taps:
            if each.returncode is None:
                each.kill()
                await each.wait()


async def test_an_open_stream_does_not_hold_up_stopping(spawn_relay, upstream):
    """SIGTERM with a tap open: the stream ends with a `bye` that says relay is stopping, and
    relay exits 0 without waiting out the drain of requests in flight."""
    relay = await spawn_relay([{"name": "seg", "kind": "segment", "url": upstream.url}],
                              admin={"token": TOKEN})
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, relay.url)
        relay.send(signal.SIGTERM)
        bye = await stream.until("bye", seconds=5)
        assert "stopping" in bye["reason"]
    assert await relay.wait_exit(5) == 0, relay.output()
    assert "still running after" not in relay.output()


async def test_a_message_the_rules_make_too_large_is_shown_invalid(write_config, upstream,
                                                                   start_relay, http):
    """A message that a `set` rule makes larger than 32 KB is not stored, and the tap shows it
    as invalid with the reason, not as forwarded."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        admin={"token": TOKEN},
                        rules=[{"type": "set", "path": "context.note", "value": "n" * 2000}])
    async with start_relay(path) as running:
        stream = await open_stream(http, running.url)
        body = {"userId": "big", "event": "Large", "properties": {"pad": "p" * 31_500}}
        assert await post(http, running.url, "/v1/track", body) == 200
        shown = await stream.until("message", user="big")
        assert shown["outcome"] == "invalid"
        assert shown["reason"].endswith("_after_rules")


async def test_hostile_messages_change_nothing_and_cannot_shut_viewers_out(
        write_config, upstream, start_relay, http, monkeypatch):
    """With a viewer open: a 480 KB invalid message is shown with its payload left out (the
    viewer stays, and one joining later too); a message nested 900 deep is answered and
    delivered exactly as with nobody watching; a staff member's email that a hash rule would
    replace is not shown in clear although the message was dropped."""
    monkeypatch.setenv("RELAY_HASH_KEY", HASH_KEY)
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        admin={"token": TOKEN},
                        rules=[*RULES[:2], {"type": "hash", "paths": ["traits.email", "userId"]}])
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(900):
        deep = {"n": deep}
    async with start_relay(path) as running:
        stream = await open_stream(http, running.url)
        huge = json.dumps({"batch": [{"type": "track", "event": "\U0001f600" * 120_000}]},
                          ensure_ascii=False).encode()  # 480 KB sent, 1.4 MB as ASCII JSON
        async with http.post(running.url + "/v1/batch", data=huge, headers=BASIC) as answer:
            assert answer.status == 200
        shown = await stream.until("message", outcome="invalid")
        assert "omitted" in shown["before"] and len(shown["event"]) == 200
        later = await open_stream(http, running.url)
        assert (await later.until("message", outcome="invalid"))["before"] == shown["before"]
        assert await post(http, running.url, "/v1/batch", {"batch": [
            {"type": "track", "userId": "u-deep", "event": "Deep", "messageId": "deep-1",
             "properties": deep}]}) == 200
        await upstream.wait_for(1)
        assert await post(http, running.url, "/v1/identify", {
            "userId": "ann", "traits": {"email": "ann@example.com"}}) == 200
        staff = await stream.until("message", outcome="dropped")
        assert "ann@example.com" not in json.dumps(staff)
        assert len(staff["before"]["traits"]["email"]) == 64
        assert running.relay.tap.viewers  # nobody was dropped along the way
    assert upstream.accepted_ids() == ["deep-1"]


async def test_a_delivery_is_shown_to_the_viewer_of_its_own_user_when_ids_collide(
        tap_config, start_relay, http, upstream):
    """Another user's message with the same messageId does not take over the delivery events
    of the first: a viewer of the first user sees its message delivered."""
    async with start_relay(tap_config) as running:
        victim = await open_stream(http, running.url, user="victim")
        await upstream.stop()
        for user in ("victim", "attacker"):
            assert await post(http, running.url, "/v1/track", {
                "userId": user, "event": "E", "messageId": "same-id"}) == 200
        assert (await victim.until("message"))["user"] == "victim"
        assert (await victim.until("delivery", seconds=5))["outcome"] == "retrying"
        await upstream.start()
        delivered = await victim.until("delivery", seconds=10, outcome="delivered")
        assert delivered["message_id"] == "same-id"


async def test_a_viewer_that_hangs_up_gives_its_place_back_within_seconds(
        tap_config, start_relay, http):
    """MAX_VIEWERS streams opened and closed by their clients: a new stream is accepted within
    a few seconds, not after the 15 s keepalive that would first notice them gone."""
    async with start_relay(tap_config) as running:
        streams = [await open_stream(http, running.url) for _ in range(hub.MAX_VIEWERS)]
        async with http.get(running.url + "/admin/tap", headers=BEARER) as response:
            assert response.status == 429
        for stream in streams:
            stream.response.close()
        for _ in range(60):
            if running.relay.tap.open == 0:
                break
            await asyncio.sleep(0.1)
        assert running.relay.tap.open == 0
        await open_stream(http, running.url)


def test_relay_tap_lines_escape_what_a_payload_could_do_to_a_terminal():
    """Control characters and lone surrogates in any field are printed escaped, and a rule that
    changed hundreds of paths makes one short line."""
    hostile = "x\x1b]0;TITLE\x07\x1b[2J\r\ud800"
    line = tap_client.line("message", {
        "at": "2026-12-07T16:00:00.000Z", "type": hostile, "event": hostile, "user": hostile,
        "outcome": "forwarded", "changes": [{"rule": hostile, "paths": [hostile] * 800}]})
    delivery = tap_client.line("delivery", {"message_id": hostile, "upstream": hostile,
                                            "outcome": hostile, "status": 200})
    for text in (line, delivery):
        assert text is not None and text.isprintable()
        assert "\x1b" not in text and "\r" not in text and "\ud800" not in text
    assert line is not None and len(line) < 400 and "more" in line
