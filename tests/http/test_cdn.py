"""First-party settings and bundle: fetched from a fake CDN on 127.0.0.1, cached, rewritten."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fakes import free_port

from relay.http import cdn

KEY = "wk_AbC-123"
SETTINGS = {"integrations": {"Segment.io": {"apiKey": KEY, "apiHost": "api.segment.io/v1",
                                            "protocol": "https"}},
            "plan": {"track": {"__default": {"enabled": True}}}}
BUNDLE = b"/* analytics.min.js */ window.analytics = 1;"


class FakeCdn:
    """The vendor's CDN: serves `settings` and `bundle`, answers `status` when it is not 200,
    and records every path asked for."""

    def __init__(self) -> None:
        self.port = free_port()
        self.settings: Any = SETTINGS
        self.bundle = BUNDLE
        self.status = 200
        self.paths: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path_qs)
        if self.status != 200:
            return web.Response(status=self.status, text="<Error/>")
        if request.path.endswith("/settings"):
            return web.json_response(self.settings)
        return web.Response(body=self.bundle, content_type="application/javascript")


@pytest.fixture
async def fake_cdn():
    """A running fake CDN."""
    fake = FakeCdn()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def relay_cdn(upstream, fake_cdn, write_config, start_relay):
    """Starts relay with the fake CDN as the upstream's cdn_url; `async with relay_cdn(...)`."""

    def start(cache_seconds: float = 300, **overrides: Any):
        up = {"name": "seg", "kind": "segment", "url": upstream.url, "cdn_url": fake_cdn.url,
              "cdn_cache_seconds": cache_seconds}
        return start_relay(write_config([up], **overrides))

    return start


async def get(http, url, **headers):
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


async def test_settings_are_rewritten_to_point_at_relay(relay_cdn, fake_cdn):
    """apiHost becomes the Host relay was asked with + /v1 and protocol its scheme; the rest of
    the settings is kept; CORS lets a page of another origin read them."""
    async with relay_cdn() as relay, aiohttp.ClientSession() as http:
        path = f"/v1/projects/{KEY}/settings"
        status, body, headers = await get(http, relay.url + path, Host="t.example.com:8443",
                                          Origin="https://www.example.com")
    assert status == 200
    settings = json.loads(body)
    assert settings["integrations"]["Segment.io"] == {
        "apiKey": KEY, "apiHost": "t.example.com:8443/v1", "protocol": "http"}
    assert settings["plan"] == SETTINGS["plan"]
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Cache-Control"].startswith("private")
    assert fake_cdn.paths == [path]


async def test_public_host_and_trusted_proto(relay_cdn):
    """public_host wins over the Host header; X-Forwarded-Proto counts from a trusted proxy."""
    async with relay_cdn(public_host="www.example.com/t", trusted_proxies=["127.0.0.1"]) as relay,\
            aiohttp.ClientSession() as http:
        _, body, _ = await get(http, relay.url + f"/v1/projects/{KEY}/settings",
                               Host="evil.test", **{"X-Forwarded-Proto": "https"})
    assert json.loads(body)["integrations"]["Segment.io"]["apiHost"] == "www.example.com/t/v1"
    assert json.loads(body)["integrations"]["Segment.io"]["protocol"] == "https"


async def test_untrusted_proto_and_bad_host(relay_cdn):
    """An untrusted peer's X-Forwarded-Proto is ignored; a Host that is no host is a 400."""
    async with relay_cdn() as relay, aiohttp.ClientSession() as http:
        url = relay.url + f"/v1/projects/{KEY}/settings"
        _, body, _ = await get(http, url, **{"X-Forwarded-Proto": "https"})
        assert json.loads(body)["integrations"]["Segment.io"]["protocol"] == "http"
        status, _, _ = await get(http, url, Host="evil.test/x?y")
        assert status == 400


async def test_bundle_is_served_as_fetched_and_cached(relay_cdn, fake_cdn):
    """The bundle is served byte for byte; while fresh, the CDN is asked once for any number
    of requests, concurrent ones included."""
    async with relay_cdn() as relay, aiohttp.ClientSession() as http:
        url = relay.url + f"/analytics.js/v1/{KEY}/analytics.min.js"
        answers = await asyncio.gather(*(get(http, url) for _ in range(5)))
    assert {(status, body) for status, body, _ in answers} == {(200, BUNDLE)}
    assert answers[0][2]["Content-Type"].startswith("application/javascript")
    assert fake_cdn.paths == [f"/analytics.js/v1/{KEY}/analytics.min.js"]


async def test_fetched_again_once_stale(relay_cdn, fake_cdn):
    """After cdn_cache_seconds the CDN is asked again and its new answer served."""
    async with relay_cdn(cache_seconds=0.2) as relay, aiohttp.ClientSession() as http:
        url = relay.url + f"/analytics.js/v1/{KEY}/analytics.min.js"
        assert (await get(http, url))[1] == BUNDLE
        fake_cdn.bundle = b"/* v2 */"
        assert (await get(http, url))[1] == BUNDLE
        await asyncio.sleep(0.3)
        assert (await get(http, url))[1] == b"/* v2 */"
    assert len(fake_cdn.paths) == 2


@pytest.mark.parametrize("outage", ["down", "500"])
async def test_stale_copy_served_while_cdn_fails(relay_cdn, fake_cdn, outage):
    """With the CDN unreachable or answering 5xx, the copy kept is served (settings still
    rewritten); with no copy, a 502."""
    async with relay_cdn(cache_seconds=0.1) as relay, aiohttp.ClientSession() as http:
        settings = relay.url + f"/v1/projects/{KEY}/settings"
        assert (await get(http, settings))[0] == 200
        if outage == "down":
            await fake_cdn.stop()
        else:
            fake_cdn.status = 503
        await asyncio.sleep(0.2)
        status, body, _ = await get(http, settings)
        assert status == 200
        assert json.loads(body)["integrations"]["Segment.io"]["apiHost"].endswith("/v1")
        status, body, _ = await get(http, relay.url + "/v1/projects/other/settings")
        assert status == 502
        assert json.loads(body)["code"] == "cdn_unavailable"


async def test_cdn_4xx_passed_on_and_bad_settings_refused(relay_cdn, fake_cdn):
    """A 404 from the CDN (an unknown key) is a 404; settings that are not settings are a 502,
    never passed on (the page would send its events past relay)."""
    async with relay_cdn() as relay, aiohttp.ClientSession() as http:
        fake_cdn.status = 404
        status, _, _ = await get(http, relay.url + "/v1/projects/nokey/settings")
        assert status == 404
        fake_cdn.status = 200
        fake_cdn.settings = ["not", "settings"]
        status, body, _ = await get(http, relay.url + "/v1/projects/list/settings")
        assert (status, json.loads(body)["code"]) == (502, "invalid_settings")


@pytest.mark.parametrize("path", [
    "/v1/projects/..%2F..%2Fadmin/settings",
    "/v1/projects/a.b/settings",
    "/v1/projects/a%40evil.test/settings",
    "/v1/projects/a/settings/../../../x",
    "/v1/projects/a/other",
    "/analytics.js/v1/a/other.js",
    "/analytics.js/v1/a%2F..%2Fb/analytics.min.js",
    "/v1/projects/" + "k" * 300 + "/settings",
    "//evil.test/v1/projects/a/settings",
])
async def test_no_other_path_reaches_the_cdn(relay_cdn, fake_cdn, path):
    """Only the two path shapes with a plain write key are fetched: anything else is a 404
    from relay and the CDN never hears of it (no SSRF)."""
    async with relay_cdn() as relay, aiohttp.ClientSession() as http:
        async with http.get(relay.url + path) as resp:
            assert resp.status == 404
        # Headers cannot move the fetch either.
        url = relay.url + f"/v1/projects/{KEY}/settings"
        await get(http, url, Host="evil.test", **{"X-Forwarded-Host": "evil.test"})
    assert fake_cdn.paths == [f"/v1/projects/{KEY}/settings"]


async def test_write_keys_limit_what_is_fetched(relay_cdn, fake_cdn):
    """With write_keys set, other keys are a 404 and never fetched."""
    async with relay_cdn(write_keys=[KEY]) as relay, aiohttp.ClientSession() as http:
        assert (await get(http, relay.url + "/v1/projects/other/settings"))[0] == 404
        assert (await get(http, relay.url + f"/v1/projects/{KEY}/settings"))[0] == 200
    assert fake_cdn.paths == [f"/v1/projects/{KEY}/settings"]


async def test_no_cdn_routes_without_cdn_url(upstream, write_config, start_relay):
    """Without a cdn_url, the settings path is not served at all."""
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with start_relay(path) as relay, aiohttp.ClientSession() as http:
        assert (await get(http, relay.url + f"/v1/projects/{KEY}/settings"))[0] == 404


def test_cache_is_bounded_in_count_and_bytes():
    """The least recently used entries go first once the count or the bytes are over."""
    cache = cdn.Cache(max_entries=3, max_bytes=10)
    for name in "abc":
        cache.put(name, cdn.Entry(200, b"xx", "", 0.0))
    cache.get("a")
    cache.put("d", cdn.Entry(200, b"xx", "", 0.0))
    assert list(cache.entries) == ["c", "a", "d"]
    cache.put("e", cdn.Entry(200, b"x" * 9, "", 0.0))
    assert list(cache.entries) == ["e"] and cache.size == 9
