"""CORS for browsers calling relay from a page of another origin: preflights and allow-origin."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

if TYPE_CHECKING:
    from relay.config.model import Cors as Settings

# Named one by one: `Authorization` is never covered by a `*` (the Fetch standard), and
# analytics.js sends it on every call, so a wildcard would fail every preflight.
ALLOW_HEADERS = "Content-Type, Authorization, X-Retry-Count"
ALLOW_METHODS = "POST, OPTIONS"
_ANY = (("Access-Control-Allow-Origin", "*"),)
# What an Origin header must be, byte for byte, before relay echoes it: `normalized` alone is
# too kind for that (str.strip() also strips U+3000 and U+2028, which cannot go in a header).
_SHAPE = re.compile(r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?",
                    re.ASCII | re.IGNORECASE)


def invalid(origins: Iterable[str]) -> str | None:
    """The config check of `cors.allow_origins`: which entry is no origin, if any."""
    for origin in origins:
        if origin != "*" and normalized(origin) is None:
            return f"{origin!r} is not an origin like https://www.example.com (or *)"
    return None


def normalized(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case, as browsers send it; None for anything else."""
    try:
        url = urlsplit(origin.strip())
        port = url.port
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/") \
            or url.query or url.fragment or url.username or url.password:
        return None
    return f"{url.scheme}://{url.netloc.lower()}" if port is None or port > 0 else None


class Cors:
    """Which origins may call relay, and the headers that tell the browser so."""

    def __init__(self, settings: Settings, paths: Iterable[str], prefixes: tuple[str, ...] = ()):
        self.any = "*" in settings.allow_origins
        self.origins = frozenset(filter(None, map(normalized, settings.allow_origins)))
        self.max_age = str(settings.max_age_seconds)
        self.paths = frozenset(paths)
        self.prefixes = prefixes

    def routes(self) -> list[web.RouteDef]:
        """An OPTIONS route (the preflight) for every path events are posted to."""
        return [web.options(path, self.preflight) for path in sorted(self.paths)]

    async def preflight(self, request: web.Request) -> web.Response:
        """The preflight's answer; allow-origin is added by `on_prepare` like on every answer."""
        return web.Response(status=204, headers={
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Max-Age": self.max_age,
        })

    def headers_for(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """What every answer on relay's browser paths carries for a request from `origin`:
        allow-origin when allowed, and, unless any origin is, `Vary: Origin` (the answer then
        differs by Origin: a shared cache must not give one origin's to another)."""
        if self.any:
            return _ANY
        if origin is not None and _SHAPE.fullmatch(origin) and normalized(origin) in self.origins:
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        return (("Vary", "Origin"),)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare` hook: every answer on relay's browser paths, errors included
        (the browser hides an error's status from the page unless it carries allow-origin)."""
        path = request.path
        if path not in self.paths and not path.startswith(self.prefixes):
            return
        for name, value in self.headers_for(request.headers.get("Origin")):
            vary = response.headers.get("Vary") if name == "Vary" else None
            if vary is None:
                response.headers[name] = value
            elif "origin" not in vary.lower():
                response.headers["Vary"] = f"{vary}, Origin"
