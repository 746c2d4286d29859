"""`GET /admin/tap` (Server-Sent Events) and the `/debugger` page's files, both behind the admin
token: the stream needs it on every request; the page's files hold no data and ask for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from relay.pipeline import TYPES
from relay.tap.hub import CUT, Filters, Tap, Viewer

STATIC = Path(__file__).resolve().parent / "static"
# A comment line this often keeps proxies and browsers from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
# How soon a viewer that hung up is noticed while its stream is quiet (it holds one of the
# MAX_VIEWERS places, and the rules are traced for it, until then).
GONE_SECONDS = 1.0
# A write the viewer's socket has not taken in this long (its buffers full: it does not read)
# ends the stream: relay holds no more for it than the socket does.
WRITE_SECONDS = 10.0
BYE_SECONDS = 1.0
MAX_FILTER = CUT
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
            tap.closed(viewer)

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
    response.force_close()  # a stream's connection is not used again
    await response.prepare(request)
    quiet_since = time.monotonic()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(viewer.ready.wait(), GONE_SECONDS)
        if request.transport is None or request.transport.is_closing():
            return response  # the viewer hung up
        if not viewer.ready.is_set() and not viewer.dropped \
                and time.monotonic() - quiet_since < KEEPALIVE_SECONDS:
            continue
        quiet_since = time.monotonic()
        if viewer.dropped:
            await _bye(request, response, viewer.dropped)
            if viewer.fell_behind:  # what the kernel still holds for it would never be read
                _abort(request)
            return response
        if not await _written(response, viewer.take() or b": keepalive\n\n", viewer):
            _abort(request)  # it does not read: nothing more would reach it
            return response


async def _written(response: web.StreamResponse, body: bytes, viewer: Viewer) -> bool:
    """Whether the viewer's socket took `body` within WRITE_SECONDS, and before the viewer was
    dropped for falling behind (a write waits while the socket's buffers are full)."""
    write = asyncio.ensure_future(response.write(body))
    ended = asyncio.ensure_future(viewer.ended.wait())
    try:
        await asyncio.wait((write, ended), timeout=WRITE_SECONDS,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
    if not write.done():
        write.cancel()
        return False
    return write.exception() is None


async def _bye(request: web.Request, response: web.StreamResponse, reason: str) -> None:
    """The stream's last event and its end; a viewer that does not take them within
    BYE_SECONDS is cut off (its connection would otherwise stay open, holding what the kernel
    buffers for it)."""
    try:
        await asyncio.wait_for(response.write(
            f"event: bye\ndata: {json.dumps({'reason': reason})}\n\n".encode()), BYE_SECONDS)
        await asyncio.wait_for(response.write_eof(), BYE_SECONDS)
    except TimeoutError:
        _abort(request)
    except ConnectionError:
        pass


def _abort(request: web.Request) -> None:
    """Resets the connection. A plain close would leave its unsent bytes with the kernel, which
    keeps the connection until the peer reads them, however long that takes: with SO_LINGER
    at 0 the close drops them and sends a reset."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)
