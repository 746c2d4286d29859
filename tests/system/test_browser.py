"""The browser SDKs in real headless Chromium, calling relay from a page of another origin."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fakes import free_port

BROWSER = Path(__file__).resolve().parent.parent / "browser"
MODULES = BROWSER / "node_modules"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SDKS = {"segment": MODULES / "@segment/analytics-next/dist/umd",
        "june": MODULES / "@june-so/analytics-next/dist/umd"}

missing = [what for what, ok in (
    ("Chromium (apt-get install -y chromium)", Path(CHROMIUM).exists()),
    ("node", shutil.which("node") is not None),
    ("the SDKs and playwright-core (npm ci --prefix tests/browser)",
     (MODULES / "playwright-core").is_dir() and all(p.is_dir() for p in SDKS.values())),
) if not ok]
pytestmark = pytest.mark.skipif(bool(missing), reason="browser tests need " + ", ".join(missing))

# Each SDK loaded from node_modules, its settings given inline (no CDN), its host set the one
# way that works for it; then identify, group and track, in order.
PAGE = """<!doctype html><html><head><title>relay {sdk}</title></head><body>
<script src="{bundle}"></script>
<script>
const {{ AnalyticsBrowser }} = window.AnalyticsNext
AnalyticsBrowser.load({load}, {options}).then(async ([analytics]) => {{
  await analytics.identify('user-1', {{ email: 'ada@customer.test', plan: 'pro' }})
  await analytics.group('acme', {{ name: 'Acme' }})
  await analytics.track('Report Viewed', {{ report: 'weekly' }})
  window.__done = true
}}).catch((err) => {{ window.__error = String(err && err.stack || err) }})
</script></body></html>"""


def page(sdk: str, relay_host: str, page_url: str) -> str:
    """The test page for `sdk`, sending to relay at `relay_host` (host:port)."""
    if sdk == "segment":
        load = {"writeKey": "wk_browser", "cdnURL": page_url,
                "cdnSettings": {"integrations": {"Segment.io": {"apiKey": "wk_browser"}}}}
        options: dict[str, Any] = {"integrations": {"Segment.io": {
            "apiHost": f"{relay_host}/v1", "protocol": "http"}}}
    else:
        load = {"writeKey": "wk_june", "cdnURL": page_url, "cdnSettings": {"integrations": {
            "june.so": {"apiHost": f"{relay_host}/sdk", "protocol": "http"}}}}
        options = {}
    return PAGE.format(sdk=sdk, bundle="/sdk/index.js", load=json.dumps(load),
                       options=json.dumps(options))


def first_party_page(relay_url: str) -> str:
    """analytics.js loaded as a site does from its own domain: the bundle and the settings from
    relay, which fetched them from the CDN; no host option at all (the settings carry it)."""
    return PAGE.format(sdk="first-party",
                       bundle=f"{relay_url}/analytics.js/v1/wk_fp/analytics.min.js",
                       load=json.dumps({"writeKey": "wk_fp", "cdnURL": relay_url}), options="{}")


async def serve_page(sdk: str, relay_host: str, html: str = "") -> AsyncIterator[str]:
    """Serves the page and the SDK's bundle (and its lazy chunks, as its CDN would) on another
    port of 127.0.0.1 than relay's, so that every call to relay is cross-origin."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    html = html or page(sdk, relay_host, url)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_static("/sdk/", SDKS[sdk])
    app.router.add_static("/analytics-next/bundles/", SDKS[sdk])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield url + "/"
    finally:
        await runner.cleanup()


async def drive(url: str) -> dict[str, Any]:
    """Runs drive.mjs on `url`; what the page did, its console and its failed requests."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(BROWSER / "drive.mjs"), url, "30000", cwd=BROWSER,
        env={**os.environ, "CHROMIUM": CHROMIUM},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@pytest.fixture
def browser_relay(upstream, write_config, start_relay):
    """relay with the group rule, forwarding to the fake vendor."""
    return start_relay(write_config(
        [{"name": "vendor", "kind": "segment", "url": upstream.url}],
        rules=[{"type": "one_group_per_user"}]))


@pytest.mark.parametrize("sdk", ["segment", "june"])
async def test_browser_sdk_through_relay(sdk, browser_relay, upstream):
    """identify, group and track from the page reach the vendor through relay with the rules
    applied (the group put on the track) and the browser's address, with no CORS error."""
    async with browser_relay as relay:
        relay_host = relay.url.removeprefix("http://")
        async for url in serve_page(sdk, relay_host):
            result = await drive(url)
        assert_clean(result, relay_host)
        messages = await upstream.wait_for(3)
    assert_rules_applied(messages)


def assert_clean(result: dict[str, Any], relay_host: str) -> None:
    """The page finished, with no CORS complaint and no failed request to relay."""
    assert result["done"], result
    assert not [line for line in result["console"] if "cors" in line.lower()
                or "access-control" in line.lower()], result["console"]
    assert not [f for f in result["failed"] if relay_host in f], result["failed"]


def assert_rules_applied(messages: list[dict[str, Any]]) -> None:
    """The page's three calls as the vendor got them: the group on the track, the ip set."""
    by_type = {m["type"]: m for m in messages}
    assert sorted(by_type) == ["group", "identify", "track"]
    assert by_type["identify"]["traits"]["email"] == "ada@customer.test"
    assert by_type["group"]["groupId"] == "acme"
    track = by_type["track"]
    assert track["event"] == "Report Viewed"
    assert track["context"]["groupId"] == "acme"  # one_group_per_user
    assert track["context"]["library"]["name"] == "analytics.js"
    assert track["context"]["ip"] == "127.0.0.1"
    assert track["userId"] == "user-1"


async def test_first_party_bundle_and_settings(upstream, write_config, start_relay):
    """With cdn_url set, the page loads analytics.js and its settings from relay (fetched from
    a fake CDN), and the rewritten settings alone send its events back to relay."""
    settings = {"integrations": {"Segment.io": {"apiKey": "wk_fp",
                                                "apiHost": "api.segment.io/v1"}}}
    bundle = (SDKS["segment"] / "index.js").read_bytes()

    async def serve_settings(request: web.Request) -> web.Response:
        return web.json_response(settings)

    async def serve_bundle(request: web.Request) -> web.Response:
        return web.Response(body=bundle, content_type="application/javascript")

    cdn = web.Application()
    cdn.router.add_get("/v1/projects/wk_fp/settings", serve_settings)
    cdn.router.add_get("/analytics.js/v1/wk_fp/analytics.min.js", serve_bundle)
    runner = web.AppRunner(cdn, access_log=None)
    await runner.setup()
    cdn_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", cdn_port).start()
    config = write_config([{"name": "vendor", "kind": "segment", "url": upstream.url,
                            "cdn_url": f"http://127.0.0.1:{cdn_port}"}],
                          rules=[{"type": "one_group_per_user"}])
    try:
        async with start_relay(config) as relay:
            async for url in serve_page("segment", "", first_party_page(relay.url)):
                result = await drive(url)
            assert_clean(result, relay.url.removeprefix("http://"))
            messages = await upstream.wait_for(3)
    finally:
        await runner.cleanup()
    assert_rules_applied(messages)
