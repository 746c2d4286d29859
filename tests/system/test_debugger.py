"""The /debugger page in real headless Chromium, against `relay serve` as a real process, fed by
the real segment-analytics-python SDK (driven through tests/browser/debugger.mjs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fakes import FakeUpstream, free_port
from processes import RelayProcess
from segment.analytics.client import Client

BROWSER = Path(__file__).resolve().parent.parent / "browser"
MODULES = BROWSER / "node_modules"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "debugger.png"

missing = [what for what, ok in (
    ("Chromium (apt-get install -y chromium)", Path(CHROMIUM).exists()),
    ("node", shutil.which("node") is not None),
    ("playwright-core (npm ci --prefix tests/browser)", (MODULES / "playwright-core").is_dir()),
) if not ok]
pytestmark = pytest.mark.skipif(bool(missing), reason="browser tests need " + ", ".join(missing))

TOKEN = "tap-admin-token-7f3c9e2d1b"
WRITE_KEY = "WK_debugger_sdk"
GROUP_RULE = "one_group_per_user#0"
STAFF_RULE = "drop_internal_users#1"
RULES = [{"type": "one_group_per_user", "inject_into": ["track"]},
         {"type": "drop_internal_users", "email_domains": ["example.com"]}]
SHOWN_WITHIN = 2.0  # seconds from the SDK call to the page's row
# What Chromium says of a fetch answered 401: expected only where the test gives a wrong token.
REFUSED = "status of 401"


class Page:
    """The debugger.mjs child: one Chromium tab on the page, driven one command a line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = 0
        self.errors = bytearray()
        self.readers = [asyncio.create_task(self._read()), asyncio.create_task(self._drain())]

    async def call(self, op: str, seconds: float = 30.0, **args: Any) -> Any:
        """Runs `op` in the page with `args`; its result, or a failure with the driver's words."""
        assert self.proc.stdin is not None
        self.ids += 1
        answer = asyncio.get_running_loop().create_future()
        self.waiting[self.ids] = answer
        line = json.dumps({"id": self.ids, "op": op, "args": args}) + "\n"
        self.proc.stdin.write(line.encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(answer, seconds)
        if not reply["ok"]:
            pytest.fail(f"{op}({args}) failed in the page: {reply['error']}\n"
                        f"{self.errors.decode(errors='replace')[-2000:]}")
        return reply["result"]

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            reply = json.loads(line)
            answer = self.waiting.pop(reply["id"], None)
            if answer is not None and not answer.done():
                answer.set_result(reply)
        gone = {"ok": False, "error": "the driver exited: "
                + self.errors.decode(errors="replace")[-2000:]}
        for answer in self.waiting.values():
            if not answer.done():
                answer.set_result(gone)

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.errors += line

    async def stop(self) -> None:
        """Closes the browser; the driver is killed by its pid if it does not exit at once."""
        with contextlib.suppress(Exception, pytest.fail.Exception):
            await self.call("close", seconds=10)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


@pytest.fixture
def relay(tmp_path: Path, upstream: FakeUpstream,
          write_config: Callable[..., Path]) -> Iterator[RelayProcess]:
    """`relay serve` with an admin token and the group and staff rules, forwarding to the fake
    upstream `segment`; killed by its pid at teardown."""
    port = free_port()
    path = write_config([{"name": "segment", "kind": "segment", "url": upstream.url}],
                        listen=f"127.0.0.1:{port}", admin={"token": TOKEN}, rules=RULES)
    process = RelayProcess(path, port, tmp_path / "relay.log")
    process.spawn()
    try:
        yield process
    finally:
        process.ensure_dead()


@pytest.fixture
async def page(relay: RelayProcess) -> AsyncIterator[Page]:
    """Chromium on relay's /debugger (not yet given the token); closed, or killed, after."""
    await relay.wait_ready()
    proc = await asyncio.create_subprocess_exec(
        "node", str(BROWSER / "debugger.mjs"), cwd=BROWSER,
        env={**os.environ, "CHROMIUM": CHROMIUM}, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    driver = Page(proc)
    try:
        await driver.call("open", url=f"{relay.url}/debugger")
        yield driver
    finally:
        await driver.stop()


@pytest.fixture
async def sdk(relay: RelayProcess) -> AsyncIterator[Client]:
    """segment-analytics-python posting to relay at once (no retries: a refusal would show)."""
    errors: list[Any] = []
    client = Client(write_key=WRITE_KEY, host=relay.url, upload_interval=0.05, max_retries=0,
                    timeout=5, on_error=lambda exc, batch: errors.append((exc, batch)))
    try:
        yield client
    finally:
        await asyncio.to_thread(client.shutdown)
    assert errors == []


async def login(page: Page) -> None:
    """Gives the page the right token; the live stream is then open."""
    shown = await page.call("login", token=TOKEN)
    assert shown == {"form_shown": False, "error": None, "status": "live"}, shown


def sent(call: tuple[bool, dict[str, Any]]) -> str:
    """The messageId of an SDK call queued successfully."""
    ok, message = call
    assert ok
    return str(message["messageId"])


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def staff(client: Client, user: str) -> tuple[str, str]:
    """A staff member's identify (email at example.com) then track; their messageIds."""
    return (sent(client.identify(user, {"email": f"ops+{user}@example.com"}, timestamp=ago(1))),
            sent(client.track(user, "Report Built", {"report": "internal"})))


def two_companies(client: Client, user: str) -> str:
    """group acme, then globex (a second later), then a track without a group; its messageId."""
    client.group(user, "acme", {"name": "Acme"}, timestamp=ago(2))
    client.group(user, "globex", {"name": "Globex"}, timestamp=ago(1))
    return sent(client.track(user, "Report Built", {"report": "weekly", "format": "pdf"}))


async def assert_clean(page: Page, relay_url: str, wrong_tokens: int = 0) -> dict[str, Any]:
    """No page error, CSP violation, failed request or console error (but the 401 of each wrong
    token given); nothing requested from anywhere but relay. What the page saw."""
    seen: dict[str, Any] = await page.call("seen")
    assert seen["errors"] == [] and seen["csp"] == [] and seen["failed"] == [], seen
    complaints = [c["text"] for c in seen["console"] if c["type"] in ("error", "warning")]
    assert [c for c in complaints if REFUSED not in c] == [], seen["console"]
    assert len(complaints) <= wrong_tokens, complaints
    assert all(r["url"].startswith((relay_url + "/", "data:")) for r in seen["requests"]), \
        seen["requests"]
    return seen


async def test_sdk_event_shows_within_two_seconds(relay, page, sdk, upstream):
    """A track sent with segment-analytics-python is on the page within 2 s, as forwarded, and
    its detail then shows it delivered to the upstream."""
    await login(page)
    started = time.time()
    message_id = sent(sdk.track("u-live", "Dashboard Viewed", {"tiles": 6}))
    row = await page.call("wait_row", message_id=message_id, timeout=5000)
    assert (row["seen_at"] / 1000) - started <= SHOWN_WITHIN, row
    assert row | {"seen_at": 0, "time": ""} == {
        "seen_at": 0, "time": "", "outcome": "forwarded", "type": "track", "user": "u-live",
        "event": "Dashboard Viewed", "rule": "—", "drop_rule": None, "changed_by": None,
        "visible": True}
    detail = await page.call("detail", message_id=message_id, upstream="segment",
                             delivery="delivered")
    assert detail["deliveries"] == [{"upstream": "segment", "outcome": "delivered",
                                     "status": "200"}]
    assert detail["outcome"] == "forwarded" and detail["changes"] == []
    assert '"Dashboard Viewed"' in detail["before"] and '"Dashboard Viewed"' in detail["after"]
    assert message_id in upstream.accepted_ids()
    await assert_clean(page, relay.url)


async def test_staff_event_shows_dropped_by_its_rule(relay, page, sdk):
    """A staff user's identify (email at example.com) and following track are shown dropped by
    the rule drop_internal_users#1, with its id and reason in the detail."""
    await login(page)
    identify_id, track_id = staff(sdk, "staff-1")
    for message_id in (identify_id, track_id):
        row = await page.call("wait_row", message_id=message_id)
        assert (row["outcome"], row["drop_rule"], row["rule"]) == (
            "dropped", STAFF_RULE, STAFF_RULE), row
    detail = await page.call("detail", message_id=track_id)
    assert (detail["outcome"], detail["rule"]) == ("dropped", STAFF_RULE), detail
    assert detail["reason"], detail
    assert detail["deliveries"] == [] and "not stored" in detail["after"]
    await assert_clean(page, relay.url)


async def test_injected_group_marked_with_its_rule(relay, page, sdk, upstream, tmp_path):
    """A user in two companies gets context.groupId injected on their track, and the detail pane
    marks that path as changed by one_group_per_user#0 (screenshot of the page taken)."""
    await login(page)
    # A few ordinary events and a staff member's first, so the picture shows a real list.
    sdk.identify("u-ada", {"email": "ada@customer.test", "plan": "pro"})
    sdk.page("u-ada", name="Reports", properties={"path": "/reports"})
    sdk.track("u-ada", "Report Viewed", {"report": "weekly"})
    _, staff_track = staff(sdk, "staff-2")
    await page.call("wait_row", message_id=staff_track)
    message_id = two_companies(sdk, "u-multi")
    row = await page.call("wait_row", message_id=message_id)
    assert (row["outcome"], row["changed_by"]) == ("forwarded", GROUP_RULE), row
    detail = await page.call("detail", message_id=message_id, upstream="segment",
                             delivery="delivered")
    assert {"rule": GROUP_RULE, "paths": ["context.groupId"]} in detail["changes"], detail
    marked = {m["path"]: m for m in detail["after_marked"]}
    assert marked["context.groupId"]["rules"] == [GROUP_RULE], detail["after_marked"]
    assert marked["context.groupId"]["text"] == '"groupId": "globex"'
    assert "context.groupId" not in {m["path"] for m in detail["before_marked"]}
    assert '"groupId"' not in detail["before"]
    shot = tmp_path / "debugger.png"
    await page.call("screenshot", path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("RELAY_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    stored = next(m for m in upstream.accepted() if m["messageId"] == message_id)
    assert stored["context"]["groupId"] == "globex"
    await assert_clean(page, relay.url)


async def test_token_asked_again_on_401_and_kept_in_session_storage_only(relay, page, sdk):
    """A wrong token is refused and asked again; the right one lives in sessionStorage only, is
    sent as a bearer header and never appears in a URL the page requested."""
    refused = await page.call("login", token=TOKEN[:-1] + "x")
    assert refused["form_shown"] and refused["status"] == "unauthorized", refused
    assert "401" in refused["error"]
    assert (await page.call("storage"))["session"] == {}
    await login(page)
    message_id = sent(sdk.track("u-token", "Settings Saved", {}))
    await page.call("wait_row", message_id=message_id)
    await page.call("view", view="users", selector="#users-updated:not(:empty)")
    await page.call("view", view="queues", selector="#queue-rows tr[data-upstream]")
    # The same tab reloaded still has the token: not asked again.
    assert await page.call("reload") == {"form_shown": False, "error": None, "status": "live"}
    stored = await page.call("storage")
    assert list(stored["session"].values()) == [TOKEN], stored
    assert stored["local"] == {} and stored["cookie"] == "", stored
    seen = await assert_clean(page, relay.url, wrong_tokens=1)
    urls = [r["url"] for r in seen["requests"]]
    assert not [u for u in urls if TOKEN in u or quote(TOKEN) in u or TOKEN[:12] in u], urls
    admin = [r for r in seen["requests"] if "/admin/" in r["url"]]
    asked = {r["url"].split("?")[0].removeprefix(relay.url) for r in admin}
    assert asked == {"/admin/tap", "/admin/report", "/admin/queue"}, asked
    # Every admin request after the wrong one carried the right token, as a header.
    assert [r["authorization"] for r in admin][1:] == [f"Bearer {TOKEN}"] * (len(admin) - 1)


async def test_users_and_queues_views_show_the_report_and_the_queue(relay, page, sdk):
    """The Users view lists the multi-company user with both groups, the staff user and the rule
    counters, with a chart bar for 2 groups; the Queues view shows the upstream's queue."""
    await login(page)
    staff(sdk, "staff-3")
    message_id = two_companies(sdk, "u-two")
    await page.call("wait_row", message_id=message_id)
    users = await page.call("view", view="users", selector="#multi-group-users tbody tr")
    assert users["multi"] == [{"user": "u:u-two", "groups": ["acme", "globex"]}], users
    assert [u["user"] for u in users["internal"]] == ["u:staff-3"], users
    assert users["counters"][f"changed.{GROUP_RULE}"] >= 1, users
    assert users["counters"][f"dropped.{STAFF_RULE}"] >= 2, users
    assert users["chart"] == [{"groups": 2, "users": 1}], users
    queues = await page.call("view", view="queues", selector="#queue-rows tr[data-upstream]")
    assert [(q["upstream"], q["paused"], q["dead_letters"]) for q in queues] == [
        ("segment", False, 0)], queues
    await assert_clean(page, relay.url)


async def test_pause_holds_new_messages_until_resumed(relay, page, sdk):
    """While paused the list stays still and counts what arrives; resuming shows it, and the
    search narrows the list to the rows that match."""
    await login(page)
    first = sent(sdk.track("u-pause", "Before Pause", {}))
    await page.call("wait_row", message_id=first)
    await page.call("click", selector="#pause")
    held = sent(sdk.track("u-pause", "While Paused", {}))
    pending = await page.call("wait_text", selector="#pending", text="1 new message")
    assert "Paused" in pending
    assert await page.call("count", selector=f'tr[data-message-id="{held}"]') == 0
    await page.call("click", selector="#pause")
    await page.call("wait_row", message_id=held)
    assert await page.call("search", text="while paused") == [held]
    assert set(await page.call("search", text="")) >= {first, held}
    await assert_clean(page, relay.url)


async def test_hostile_payload_shown_as_text(relay, page, sdk):
    """Markup in a message's user, event name and properties is shown as the literal text it
    is: no element is made of it and nothing it names is fetched."""
    await login(page)
    evil = '<img src="/x.png" onerror="document.title=1"><script>document.title=2</script>'
    message_id = sent(sdk.track(evil, evil, {evil: evil}))
    row = await page.call("wait_row", message_id=message_id)
    assert (row["event"], row["user"]) == (evil, evil), row
    detail = await page.call("detail", message_id=message_id)
    assert f"{json.dumps(evil)}: {json.dumps(evil)}" in detail["after"], detail["after"]
    assert await page.call("count", selector="img, body script, #detail *[onerror]") == 0
    seen = await assert_clean(page, relay.url)
    assert not [r for r in seen["requests"] if "x.png" in r["url"]]
