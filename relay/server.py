"""`relay serve`: runs the Application until SIGTERM/SIGINT, then stops without losing a request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from typing import Any

from aiohttp import web

try:
    import uvloop
except ImportError:  # Windows: it does not exist there
    uvloop = None  # type: ignore[assignment]

from relay import app
from relay.config.model import Config, Limits
from relay.http import client_address, connection, event_routes
from relay.http.admission import Connections
from relay.http.listener_state import ListenerState

log = logging.getLogger("relay")

# How long requests already being received may take to finish once relay is asked to stop.
DRAIN_SECONDS = 10.0
# How often slow request heads and bodies are looked for.
SWEEP_SECONDS = 0.25
# Container allocations (less deallocations) between collections of the youngest generation;
# Python's default is 700. A batch of 100 messages alone allocates more than 700 dicts and
# frees them once answered, so at 700 nearly every request ran a collection that walked every
# message still in flight (~6% of the main thread under batch load); at 20,000 the garbage
# is freed by reference counting first, and cycles still get collected (bench/profile.md).
YOUNG_THRESHOLD = 20_000


def server_options(limits: Limits) -> dict[str, Any]:
    """aiohttp's options for `limits`. Its keep-alive timer, armed when a connection opens and
    again after each answer, closes a connection whose next request head is not complete by
    then (bytes trickling in do not reset it): that is the header timeout."""
    return {**app.SERVER_OPTIONS, "keepalive_timeout": limits.header_seconds}


class Inflight:
    """Counts requests being handled, so that a stop can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.stopping = False
        self.idle = asyncio.Event()
        self.idle.set()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: event_routes.Handler) -> web.StreamResponse:
        self.count += 1
        self.idle.clear()
        try:
            response = await handler(request)
            if self.stopping:
                response.force_close()  # tell keep-alive clients to go elsewhere
            return response
        finally:
            self.count -= 1
            if self.count == 0:
                self.idle.set()


def run(config: Config) -> None:
    """Serves on uvloop where it is installed (a quarter less CPU per request, measured in
    bench/), else on asyncio's own loop."""
    if uvloop is None:
        asyncio.run(serve(config))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config))


class Listener:
    """relay's Application listening on host:port: each connection starts with a SdkConnection (SDK
    posts), which hands anything else to aiohttp. Counted against limits.max_connections."""

    def __init__(self, application: web.Application, config: Config) -> None:
        self.application = application
        self.config = config
        self.runner = web.AppRunner(application, handle_signals=False, shutdown_timeout=1.0,
                                    **server_options(config.limits))
        self.server: asyncio.Server | None = None
        self.shared: ListenerState | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.admin: web.AppRunner | None = None  # at admin.listen, when set

    async def start(self, port: int | None = None, admin_port: int | None = None) -> None:
        """Binds first, so that a port in use ends relay before anything delivers; then opens
        storage and starts the forwarders (the Application's startup), then serves (`port` and
        `admin_port` instead of the configured ones, for tests: 0 is any free one)."""
        reuse = self.config.workers > 1
        sock = socket.create_server((self.config.host, self.config.port if port is None else port),
                                    backlog=128, reuse_port=reuse)
        admin = self.config.admin
        admin_sock = socket.create_server(
            (admin.host, admin.port if admin_port is None else admin_port), backlog=16,
            reuse_port=reuse) if admin.listen else None
        await self.runner.setup()
        relay = self.application[app.RELAY]
        fallback = self.runner.server
        assert fallback is not None
        limits = self.config.limits
        connections = Connections(limits.max_connections)
        self.shared = shared = ListenerState(
            lambda: relay.ingest, fallback, self.application[app.CORS],
            self.application[client_address.PROXIES], limits.header_seconds, limits.body_seconds,
            connections)
        relay.metrics.connections = shared.held
        self.server = await asyncio.get_running_loop().create_server(
            lambda: connections.protocol(lambda: connection.SdkConnection(shared)), sock=sock,
            backlog=128)
        self._sweeper = asyncio.create_task(_sweep(shared), name="sweep-connections")
        if admin_sock is not None:
            await self._start_admin(admin_sock)
        relay.log_start(self.port)

    async def _start_admin(self, sock: socket.socket) -> None:
        self.admin = web.AppRunner(app.build_admin(self.application[app.RELAY]),
                                   handle_signals=False, shutdown_timeout=1.0,
                                   **server_options(self.config.limits))
        await self.admin.setup()
        await web.SockSite(self.admin, sock, backlog=16).start()

    @property
    def admin_port(self) -> int:
        """The port of admin.listen (as bound: a test asks for any free one)."""
        assert self.admin is not None
        port: int = self.admin.addresses[0][1]
        return port

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def drain(self, inflight: Inflight, seconds: float) -> None:
        """Stops listening; waits up to `seconds` for requests in flight, in aiohttp and in
        the Fronts, to be answered (their bodies still arrive)."""
        if self.server is not None:
            self.server.close()
        shared = self.shared
        if shared is not None:
            shared.stopping = True
        started = time.monotonic()
        waits = [inflight.idle.wait()] + ([shared.idle.wait()] if shared is not None else [])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), seconds)
        left = inflight.count + (shared.inflight if shared is not None else 0)
        if left:
            log.warning("relay: %d request(s) still running after %.0fs; closing them",
                        left, time.monotonic() - started)

    async def close(self) -> None:
        """Closes every connection, then the Application (storage, forwarders)."""
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.shared is not None:
            for connection in list(self.shared.open):
                connection.close()
        if self.admin is not None:
            await self.admin.cleanup()
        await self.runner.cleanup()


async def _sweep(shared: ListenerState) -> None:
    """Cuts off connections whose request head or body is too slow (SdkConnection.sweep)."""
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        now = time.monotonic()
        for each in list(shared.open):
            each.sweep(now)


async def serve(config: Config) -> None:
    """Serves until a stop signal; then stops listening, lets requests in flight finish (their
    bodies still arrive, unlike in aiohttp's own shutdown), and stops the parts."""
    inflight = Inflight()
    application = app.build(config, middlewares=[inflight.middleware])
    listener = Listener(application, config)
    loop = asyncio.get_running_loop()
    # For relay's whole life: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, application[app.RELAY].hangup)
    try:
        await listener.start()
        # What exists once relay is up (modules, the app, the rules) lives as long as the
        # process; left to the collector, each full collection walks it all again: ~30 ms of
        # CPU in which no request is answered (bench/profile.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("relay: stopping; %d request(s) in flight", inflight.count)
        application[app.RELAY].tap.close("relay is stopping")  # open streams are no request
        inflight.stopping = True
        await listener.drain(inflight, DRAIN_SECONDS)
    finally:
        await listener.close()
