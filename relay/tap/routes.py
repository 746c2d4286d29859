"""`GET /admin/tap` (Server-Sent Events) and the `/debugger` page's files, both behind the admin
token: the stream needs it on every request; the page's files hold no data and ask for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from relay.pipeline import TYPES
from relay.tap.hub import Filters, Tap, Viewer

STATIC = Path(__file__).resolve().parent / "static"
# A comment line this often keeps proxies and browsers from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
# A write the viewer's socket has not taken in this long (its buffers full: it does not read)
# ends the stream: relay holds no more for it than the socket does.
WRITE_SECONDS = 10.0
MAX_FILTER = 200
OUTCOMES = ("forwarded", "dropped", "invalid", "refused")
# Scripts and styles from relay itself, nothing inline, nothing third-party, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
                               " connect-src 'self'; img-src 'self' data:; base-uri 'none';"
                               " form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
TYPES_OF = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
            ".svg": "image/svg+xml"}
_NAME = re.compile(r"[a-z][a-z0-9-]*\.(html|js|css|svg)")

Authorized = Callable[[web.Request], bool]
Refusal = Callable[[], web.Response]


def routes(tap: Tap, authorized: Authorized, unauthorized: Refusal) -> list[web.RouteDef]:
    """The tap's stream and the page; `authorized` checks a request's bearer token."""
    files = {path.name: path for path in STATIC.glob("*") if _NAME.fullmatch(path.name)}

    async def stream(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return unauthorized()
        try:
            filters = parse_filters(request.query)
        except ValueError as exc:
            return _error(400, "invalid_filter", str(exc))
        viewer = tap.join(filters)
        if viewer is None:
            return _error(429, "too_many_viewers", "the tap has as many viewers as it takes;"
                                                   " close one and try again")
        try:
            return await _send(request, viewer)
        finally:
            tap.leave(viewer)

    async def page(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info.get("name", "index.html"))
        if path is None:
            return _error(404, "not_found", "no such file in the debugger page")
        return web.Response(body=path.read_bytes(), headers=PAGE_HEADERS,
                            content_type=TYPES_OF[path.suffix],
                            charset="utf-8" if path.suffix != ".svg" else None)

    return [web.get("/admin/tap", stream), web.get("/debugger", page),
            web.get("/debugger/{name}", page)]


def parse_filters(query: Mapping[str, str]) -> Filters:
    """A viewer's filters from the query string; ValueError says which one is wrong."""
    values = {name: query.get(name, "") for name in ("user", "type", "event", "outcome",
                                                     "upstream")}
    for name, value in values.items():
        if len(value) > MAX_FILTER:
            raise ValueError(f"{name}: at most {MAX_FILTER} characters")
    if values["type"] and values["type"] not in TYPES:
        raise ValueError(f"type: one of {', '.join(sorted(TYPES))}")
    if values["outcome"] and values["outcome"] not in OUTCOMES:
        raise ValueError(f"outcome: one of {', '.join(OUTCOMES)}")
    return Filters(**values)


async def _send(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no"})  # nginx would hold events back to fill its buffer
    await response.prepare(request)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(viewer.ready.wait(), KEEPALIVE_SECONDS)
        if viewer.dropped:
            body = f"event: bye\ndata: {json.dumps({'reason': viewer.dropped})}\n\n".encode()
        else:
            body = viewer.take() or b": keepalive\n\n"
        try:
            await asyncio.wait_for(response.write(body), WRITE_SECONDS)
        except (TimeoutError, ConnectionError):
            return response
        if viewer.dropped:
            return response


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)
