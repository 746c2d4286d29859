"""CORS and the caller's address, against a running relay, as browsers and proxies call it."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from relay.config import model as config
from relay.http import client_address, cors
from relay.ingest import segment

PREFLIGHT = {"Origin": "http://page.test:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture
def relay_with(upstream, write_config, start_relay):
    """Starts relay with extra top-level config keys; use as `async with relay_with(...)`."""

    def start(**overrides):
        return start_relay(write_config(
            [{"name": "seg", "kind": "segment", "url": upstream.url}], **overrides))

    return start


async def test_preflight_on_every_inbound_path(relay_with):
    """OPTIONS on each path events are posted to is answered with the full CORS grant."""
    async with relay_with() as relay, aiohttp.ClientSession() as http:
        for route in segment.routes():
            async with http.options(relay.url + route.path, headers=PREFLIGHT) as resp:
                assert resp.status == 204, route.path
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                assert resp.headers["Access-Control-Allow-Headers"] == \
                    "Content-Type, Authorization, X-Retry-Count"
                assert resp.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
                assert resp.headers["Access-Control-Max-Age"] == "86400"


async def test_post_answers_carry_allow_origin(relay_with, upstream):
    """A 200 and an error alike carry allow-origin, so the page can read either; other routes
    (operations) do not."""
    async with relay_with() as relay, aiohttp.ClientSession() as http:
        body = b'{"userId": "u", "event": "E"}'
        async with http.post(relay.url + "/v1/t", data=body, headers=PREFLIGHT) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        async with http.post(relay.url + "/v1/t", data=b"nope", headers=PREFLIGHT) as resp:
            assert resp.status == 400
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        async with http.get(relay.url + "/healthz", headers=PREFLIGHT) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_listed_origins_are_echoed_others_refused(relay_with):
    """With a list of origins, a listed one is echoed (any case) with Vary: Origin; another
    origin gets no allow-origin, so the browser blocks it."""
    cors_conf = {"allow_origins": ["https://www.example.com", "http://page.test:3000"],
                 "max_age_seconds": 600}
    async with relay_with(cors=cors_conf) as relay, aiohttp.ClientSession() as http:
        url = relay.url + "/v1/i"
        async with http.options(url, headers=PREFLIGHT) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "http://page.test:3000"
            assert resp.headers["Vary"] == "Origin"
            assert resp.headers["Access-Control-Max-Age"] == "600"
        headers = {**PREFLIGHT, "Origin": "https://WWW.example.com"}
        async with http.options(url, headers=headers) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "https://WWW.example.com"
        for origin in ("https://evil.test", "https://www.example.com.evil.test", "null"):
            async with http.options(url, headers={**PREFLIGHT, "Origin": origin}) as resp:
                assert "Access-Control-Allow-Origin" not in resp.headers, origin
                assert resp.headers["Vary"] == "Origin"
            async with http.post(url, data=b'{"userId": "u"}', headers={"Origin": origin}) as r:
                assert "Access-Control-Allow-Origin" not in r.headers


def test_config_checks_origins_and_proxies():
    """Entries that are no origin or no address/CIDR are config errors naming the entry."""
    assert cors.invalid(["*", "https://a.example", "http://b.example:8080/"]) is None
    for bad in ("a.example", "https://a.example/path", "ftp://a.example", "https://"):
        assert bad in str(cors.invalid([bad]))
    assert client_address.invalid(["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8"]) is None
    assert "10.0.0.0/33" in str(client_address.invalid(["10.0.0.0/33"]))
    text = ("upstreams: [{name: s, kind: segment, url: 'http://x'}]\n"
            "trusted_proxies: [nope]\ncors: {allow_origins: [www.example.com]}\n")
    with pytest.raises(config.ConfigError) as info:
        config.parse("relay.yaml", text)
    paths = [e.split(": ")[1] for e in info.value.errors]
    assert paths == ["trusted_proxies", "cors.allow_origins"]


def request(peer: str, *forwarded: str, proto: str = "") -> aiohttp.web.Request:
    """A request from `peer` with these X-Forwarded-For headers (one each)."""
    headers = [("X-Forwarded-For", f) for f in forwarded]
    if proto:
        headers.append(("X-Forwarded-Proto", proto))
    return make_mocked_request("POST", "/v1/t", headers=CIMultiDict(headers)).clone(remote=peer)


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # an untrusted peer's header is ignored
        ("10.0.0.5", [], "10.0.0.5"),  # a proxy that sent no header: the proxy is all we know
        ("10.0.0.5", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.7, 10.0.0.9"], "198.51.100.7"),  # spoofed left part
        ("10.0.0.5", ["6.6.6.6", "198.51.100.7"], "198.51.100.7"),  # two headers, one chain
        ("10.0.0.5", ["10.1.1.1, 10.0.0.9"], "10.1.1.1"),  # only proxies: the farthest back
        ("10.0.0.5", ["garbage, 198.51.100.7"], "198.51.100.7"),
        ("10.0.0.5", ["198.51.100.7, garbage"], "10.0.0.5"),  # unreadable: stop believing
        ("10.0.0.5", ["198.51.100.7:4711"], "198.51.100.7"),
        ("10.0.0.5", ["[2001:db8::7]:4711"], "2001:db8::7"),
        ("::ffff:10.0.0.5", ["2001:db8::7"], "2001:db8::7"),  # a v4 proxy on a dual-stack socket
        ("10.0.0.5", ["", "\x00\xff"], "10.0.0.5"),
    ],
)
def test_client_address_behind_proxies(peer, forwarded, client):
    """X-Forwarded-For is read right to left, only from trusted peers, and never fails."""
    proxies = client_address.Proxies(["10.0.0.0/8"])
    assert proxies.client(request(peer, *forwarded)) == client


def test_scheme_from_trusted_proxy_only():
    """X-Forwarded-Proto counts only from a trusted peer and only as http or https."""
    proxies = client_address.Proxies(["10.0.0.0/8"])
    assert proxies.scheme(request("10.0.0.5", proto="https")) == "https"
    assert proxies.scheme(request("203.0.113.9", proto="https")) == "http"
    assert proxies.scheme(request("10.0.0.5", proto="gopher")) == "http"


async def test_context_ip_from_forwarded_for(relay_with, upstream):
    """Behind a trusted proxy the browser's address lands in context.ip; without trust (the
    default) the peer's does, whatever the header claims; a backend call gets none."""
    spoof = {"X-Forwarded-For": "198.51.100.7"}
    body = b'{"userId": "u", "event": "E"}'
    async with relay_with(trusted_proxies=["127.0.0.0/8"]) as relay, \
            aiohttp.ClientSession() as http:
        await http.post(relay.url + "/v1/t", data=body, headers=spoof)
        await http.post(relay.url + "/v1/track", data=body, headers=spoof)
        first, backend = await upstream.wait_for(2)
    assert first["context"]["ip"] == "198.51.100.7"
    assert "ip" not in backend.get("context", {})


async def test_untrusted_forwarded_for_is_ignored(relay_with, upstream):
    """With no trusted proxies, X-Forwarded-For cannot choose context.ip."""
    async with relay_with() as relay, aiohttp.ClientSession() as http:
        await http.post(relay.url + "/v1/t", data=b'{"userId": "u", "event": "E"}',
                        headers={"X-Forwarded-For": "198.51.100.7"})
        (message,) = await upstream.wait_for(1)
    assert message["context"]["ip"] == "127.0.0.1"
