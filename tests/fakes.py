"""A real vendor stand-in: an aiohttp server on 127.0.0.1 with scripted answers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted answer: a status, or `hang` (never answer) / `reset` (drop the connection)."""

    status: int = 200
    body: str = '{"success": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    reset: bool = False


@dataclass
class Received:
    """One request as the fake vendor saw it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    at: float = field(default_factory=time.monotonic)  # when it was recorded (monotonic)
    size: int = 0  # bytes of the (decompressed) request body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeUpstream:
    """Records every batch; answers from `script` (first to last), then `default`.

    `reject` names messageIds answered 400 whenever a batch holds one of them (a poison message);
    `reject_reply` is that answer (change it to refuse them with, say, 413).
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.script: deque[Reply] = deque()
        self.default = Reply()
        self.reject: set[str] = set()
        self.reject_reply = Reply(400, '{"code":"invalid","message":"bad message"}')
        self.requests: list[Received] = []
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        """Stops listening: connections are refused until `start` again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def accepted(self) -> list[dict[str, Any]]:
        """Every message of every batch answered 2xx, in arrival order."""
        return [m for r in self.requests if 200 <= r.status < 300 for m in r.body.get("batch", [])]

    def accepted_ids(self) -> list[str]:
        return [m["messageId"] for m in self.accepted()]

    async def wait_for(self, count: int, seconds: float = 20.0) -> list[dict[str, Any]]:
        """Waits until at least `count` messages were accepted; fails loudly otherwise."""

        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.accepted()) >= count)

        try:
            await asyncio.wait_for(enough(), seconds)
        except TimeoutError:
            raise AssertionError(
                f"fake upstream got {len(self.accepted())} of {count} messages in {seconds}s"
            ) from None
        return self.accepted()

    async def wait_for_requests(self, count: int, seconds: float = 20.0) -> list[Received]:
        """Waits until at least `count` requests were answered (any status, resets included)."""

        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.requests) >= count)

        try:
            await asyncio.wait_for(enough(), seconds)
        except TimeoutError:
            raise AssertionError(
                f"fake upstream got {len(self.requests)} of {count} requests in {seconds}s"
            ) from None
        return self.requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        reply = self.script.popleft() if self.script else self.default
        ids = {m.get("messageId") for m in body.get("batch", [])}
        if reply.status < 300 and ids & self.reject:
            reply = self.reject_reply
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.reset:
            assert request.transport is not None
            request.transport.abort()
            self._record(request, body, 0, len(raw))
            async with self._arrived:
                self._arrived.notify_all()
            return web.Response()
        self._record(request, body, reply.status, len(raw))
        async with self._arrived:
            self._arrived.notify_all()
        return web.Response(status=reply.status, text=reply.body, headers=reply.headers,
                            content_type="application/json")

    def _record(
        self, request: web.Request, body: dict[str, Any], status: int, size: int = 0
    ) -> None:
        self.requests.append(Received(request.path, dict(request.headers), body, status,
                                      size=size))
