"""analytics.js's settings and bundle served first-party: fetched from the vendor's CDN, cached,
and the settings rewritten so that the page sends its events back to relay."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from relay.http.client_address import Proxies

if TYPE_CHECKING:
    from relay.config.model import Upstream

log = logging.getLogger("relay.cdn")

# The only two shapes relay ever fetches; the write key is the only part taken from the request,
# and this pattern keeps it from reaching another path (no `/`, `.`, `%` or `?`).
KEY = r"{write_key:[A-Za-z0-9_-]{1,256}}"
SETTINGS = f"/v1/projects/{KEY}/settings"
BUNDLE = f"/analytics.js/v1/{KEY}/analytics.min.js"
PREFIXES = ("/v1/projects/", "/analytics.js/v1/")

MAX_BODY = 4 * 1024 * 1024  # analytics.min.js is ~300 KB, settings with many destinations less
MAX_ENTRIES = 1000
MAX_CACHED_BYTES = 64 * 1024 * 1024
RETRY_SECONDS = 10.0  # after a failed refresh, stale answers without asking the CDN again
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


class CdnError(Exception):
    """The CDN could not give an answer worth keeping (unreachable, 3xx, 5xx, too large)."""


@dataclass
class Entry:
    """One cached CDN answer; `fresh_until` is on the monotonic clock."""

    status: int
    body: bytes
    content_type: str
    fresh_until: float


class Cache:
    """CDN answers by path, least recently used first out, bounded in count and bytes."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_CACHED_BYTES) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0

    def get(self, path: str) -> Entry | None:
        entry = self.entries.get(path)
        if entry is not None:
            self.entries.move_to_end(path)
        return entry

    def put(self, path: str, entry: Entry) -> None:
        old = self.entries.pop(path, None)
        if old is not None:
            self.size -= len(old.body)
        self.entries[path] = entry
        self.size += len(entry.body)
        while len(self.entries) > self.max_entries or self.size > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.size -= len(dropped.body)


def rewrite(body: bytes, api_host: str, protocol: str) -> bytes:
    """The settings JSON with `integrations["Segment.io"]` pointing at relay; ValueError when
    it is not settings (served as they are, they would send the page's events past relay)."""
    settings = json.loads(body)
    integrations = settings.setdefault("integrations", {}) if isinstance(settings, dict) else None
    if not isinstance(integrations, dict):
        raise ValueError("the settings are not a JSON object with `integrations`")
    segment = integrations.setdefault("Segment.io", {})
    if not isinstance(segment, dict):
        raise ValueError('the settings\' integrations["Segment.io"] is not an object')
    segment["apiHost"] = api_host
    segment["protocol"] = protocol
    return json.dumps(settings, separators=(",", ":")).encode()


class Cdn:
    """The two first-party routes, for the upstream's `cdn_url` (from config only)."""

    def __init__(self, upstream: Upstream, proxies: Proxies, public_host: str,
                 write_keys: Callable[[], frozenset[str]]) -> None:
        self.url = upstream.cdn_url.rstrip("/")
        self.fresh_seconds = upstream.cdn_cache_seconds
        self.timeout = aiohttp.ClientTimeout(total=upstream.timeout_seconds)
        self.proxies = proxies
        self.public_host = public_host.rstrip("/")
        self.write_keys = write_keys  # read per request: a reload may change them
        self.cache = Cache()
        self.pending: dict[str, asyncio.Task[Entry | None]] = {}
        self.session: aiohttp.ClientSession | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.get(SETTINGS, self.settings, allow_head=False),
                web.get(BUNDLE, self.bundle, allow_head=False)]

    async def close(self, app: web.Application) -> None:
        """on_cleanup hook: fetches in flight stopped, the client session closed."""
        for task in list(self.pending.values()):
            task.cancel()
        await asyncio.gather(*self.pending.values(), return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def settings(self, request: web.Request) -> web.Response:
        """GET /v1/projects/{writeKey}/settings, its `apiHost` and `protocol` made relay's."""
        host = self.public_host or request.host
        if not self.public_host and not _HOST.fullmatch(host):
            return _error(400, "invalid_host", "the Host header is not host[:port]")
        entry, answer = await self._entry(request)
        if entry is None or entry.status != 200:
            return answer
        try:
            body = rewrite(entry.body, f"{host}/v1", self.proxies.scheme(request))
        except ValueError as exc:
            log.warning("cdn: %s answered settings relay cannot read: %s", self.url, exc)
            return _error(502, "invalid_settings", "the CDN's settings are not JSON settings")
        # Private: the answer depends on the Host and X-Forwarded-Proto it was asked with.
        return web.Response(body=body, content_type="application/json", headers={
            "Cache-Control": f"private, max-age={int(self.fresh_seconds)}"})

    async def bundle(self, request: web.Request) -> web.Response:
        """GET /analytics.js/v1/{writeKey}/analytics.min.js, as the CDN serves it."""
        entry, answer = await self._entry(request)
        if entry is None or entry.status != 200:
            return answer
        return web.Response(body=entry.body, headers={
            "Content-Type": entry.content_type or "application/javascript",
            "Cache-Control": f"public, max-age={int(self.fresh_seconds)}"})

    async def _entry(self, request: web.Request) -> tuple[Entry | None, web.Response]:
        """The cached or fetched entry for the request's path, with the answer to give when it
        is missing or not a 200."""
        keys = self.write_keys()
        if keys and request.match_info["write_key"] not in keys:
            return None, _error(404, "unknown_write_key", "no settings for this write key")
        entry = await self.get(request.path)
        if entry is None:
            return None, _error(502, "cdn_unavailable", "the CDN cannot be reached")
        return entry, _error(entry.status, "cdn_status", f"the CDN answered {entry.status}")

    async def get(self, path: str) -> Entry | None:
        """The entry for `path`: cached while fresh, else fetched once for all who ask; the
        stale one while the CDN fails; None when there is nothing to give."""
        entry = self.cache.get(path)
        if entry is not None and time.monotonic() < entry.fresh_until:
            return entry
        task = self.pending.get(path)
        if task is None:
            task = asyncio.create_task(self._refresh(path, entry))
            self.pending[path] = task
            task.add_done_callback(lambda _: self.pending.pop(path, None))
        # Shielded: one caller going away must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    async def _refresh(self, path: str, stale: Entry | None) -> Entry | None:
        try:
            entry = await self._fetch(path)
        except CdnError as exc:
            if stale is None:
                log.warning("cdn: %s%s: %s", self.url, path, exc)
                return None
            log.warning("cdn: %s%s: %s; serving the copy kept", self.url, path, exc)
            stale.fresh_until = time.monotonic() + min(RETRY_SECONDS, self.fresh_seconds)
            return stale
        self.cache.put(path, entry)
        return entry

    async def _fetch(self, path: str) -> Entry:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            # No header of the browser's is passed on, and redirects are not followed: relay
            # asks the configured CDN for exactly this path and nothing else.
            async with self.session.get(self.url + path, allow_redirects=False) as resp:
                if resp.status >= 500 or 300 <= resp.status < 400:
                    raise CdnError(f"answered {resp.status}")
                body = await _read(resp)
                kind = resp.headers.get("Content-Type", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CdnError(f"cannot fetch: {exc or type(exc).__name__}") from None
        return Entry(resp.status, body, kind, time.monotonic() + self.fresh_seconds)


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY:
            raise CdnError(f"answer is over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)
