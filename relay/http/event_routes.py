"""The event routes as aiohttp serves them: for a request that the llhttp connection hands over
(one it does not parse itself) and for every event post when relay runs behind aiohttp alone.
The body is read here, bounded in size and time; `relay.ingest` answers it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from relay.http import client_address
from relay.ingest import segment
from relay.ingest.receiver import Answer, Ingest
from relay.ingest.segment import PayloadError, Route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes(ingest: Ingest) -> list[web.RouteDef]:
    """A POST route for every inbound path."""
    return [web.post(route.path, _handler(ingest, route)) for route in segment.routes()]


def response(answer: Answer) -> web.Response:
    """`answer` as aiohttp's response."""
    return web.Response(status=answer.status, body=answer.body, headers=dict(answer.headers),
                        content_type="application/json")


def _handler(ingest: Ingest, route: Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            raw = await read_body(request, ingest.body_seconds)
        except PayloadError as exc:
            ingest.metrics.answered(route.path, exc.status)
            return response(Answer.error(exc.status, exc.code, exc.message))
        answer = await ingest.answer(route, raw, request.headers.get("Content-Encoding", ""),
                                     request.headers.get("Authorization"),
                                     client_address.client(request))
        return response(answer)

    return handle


async def read_body(request: web.Request, seconds: float) -> bytes:
    """The body as sent; 413 as soon as it passes the limit, 408 when it is too slow."""
    limit = segment.MAX_REQUEST_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise PayloadError(413, "request_too_large", f"request body is over {limit} bytes")
    if request.content.is_eof() and request.content_length is not None:
        # The whole body is already buffered: no reading to wait for, so no timer to arm.
        return await request.content.read()
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise PayloadError(413, "request_too_large", f"body is over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise PayloadError(408, "body_timeout", f"body not read within {seconds}s") from None
    except (HttpProcessingError, RequestPayloadError) as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise PayloadError(400, "invalid_body", f"cannot read body: {detail}") from None
    return b"".join(chunks)
