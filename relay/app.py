"""Wires config, storage, rules, ingest and forwarders into one aiohttp Application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from relay.config import Config
from relay.forwarder import Forwarder
from relay.ingest import Ingest, mask
from relay.outbox import Outbox
from relay.pipeline import Pipeline
from relay.reloader import Reloader
from relay.state import SqliteState

log = logging.getLogger("relay")


class Relay:
    """The running parts of one relay, started and stopped with the Application."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.outbox = Outbox(config.storage.path, [u.name for u in config.upstreams],
                             config.storage.synchronous)
        self.state = SqliteState(config.storage.path, config.storage.cache_size)
        self.ingest = Ingest(config.write_keys, Pipeline(config.rules, config.on_rule_error),
                             self.state, self.outbox)
        self.forwarders: list[Forwarder] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: storage and forwarders up before serving, down after."""
        await self.outbox.open()
        try:
            await self.state.open()
        except BaseException:
            await self.outbox.close()
            raise
        session = aiohttp.ClientSession()
        for upstream in self.config.upstreams:
            forwarder = Forwarder(upstream, self.outbox, session)
            self.forwarders.append(forwarder)
            self.tasks.append(asyncio.create_task(forwarder.run(), name=f"forward-{upstream.name}"))
        if self.config.file:
            reloader = Reloader(self.config.file, self.config, self.apply)
            self.tasks.append(asyncio.create_task(reloader.run(), name="reload"))
        self._log_start()
        try:
            yield
        finally:
            await self._stop()
            await session.close()
            await self.outbox.close()
            await self.state.close()

    async def _stop(self) -> None:
        grace = self.config.shutdown_grace_seconds
        for forwarder in self.forwarders:
            forwarder.stop(grace)
        for task in self.tasks[len(self.forwarders):]:
            task.cancel()  # the reloader: nothing to finish
        _, late = await asyncio.wait(self.tasks, timeout=grace + 1.0) if self.tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for queue in await self.outbox.stats():
            if queue.messages:
                log.info("stopped: %d message(s) for %s kept for the next start", queue.messages,
                         queue.upstream)

    def apply(self, config: Config) -> None:
        """Takes the rules and write keys of a reloaded config; the next message uses them."""
        self.ingest.pipeline = Pipeline(config.rules, config.on_rule_error)
        self.ingest.write_keys = frozenset(config.write_keys)

    def ready(self) -> dict[str, bool]:
        """What /readyz checks: storage writable, every forwarder running."""
        running = bool(self.tasks) and all(not t.done() for t in self.tasks)
        return {"storage": self.outbox.writable, "forwarders": running}

    def _log_start(self) -> None:
        config = self.config
        keys = ", ".join(mask(k) for k in config.write_keys) or "any"
        ups = ", ".join(
            f"{u.name} ({u.kind} {u.url}, key {mask(u.write_key) if u.write_key else 'from SDK'})"
            for u in config.upstreams
        )
        log.info("relay: listening on %s; storage %s; write keys %s; %d rule(s); upstreams: %s",
                 config.listen, config.storage.path, keys, len(config.rules), ups)
        for note in config.warnings:
            log.warning("%s", note)


RELAY = web.AppKey("relay", Relay)

# Passed to aiohttp's server. Its lingering close (the default) stays on: after an early 413 it
# reads and discards the rest of the body, so the client sees the answer rather than a reset,
# which every SDK would retry forever.
SERVER_OPTIONS: dict[str, Any] = {
    "access_log": None,
    # relay inflates bodies itself, to bound the size and to answer bad encodings with JSON.
    "auto_decompress": False,
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build(config: Config, middlewares: Sequence[Any] = ()) -> web.Application:
    """The Application for `config`; storage opens when it starts."""
    app = web.Application(middlewares=middlewares)
    relay = Relay(config)
    app[RELAY] = relay
    app.cleanup_ctx.append(relay.lifecycle)
    app.add_routes(relay.ingest.routes())
    app.add_routes([web.get("/healthz", _healthz), web.get("/readyz", _readyz)])
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    checks = request.app[RELAY].ready()
    ok = all(checks.values())
    return web.json_response({"ready": ok, **checks}, status=200 if ok else 503)
