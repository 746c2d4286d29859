"""Wires config, storage, rules, ingest and forwarders into one aiohttp Application."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from relay.config.model import Config
from relay.delivery.forwarder import Forwarder
from relay.http import cdn, client_address, cors, event_routes
from relay.ingest import segment
from relay.ingest.receiver import Ingest
from relay.ingest.release import Releaser
from relay.logs import mask
from relay.metrics import CONTENT_TYPE, Metrics
from relay.ops import queue, report
from relay.outbox import stats as outbox_stats
from relay.outbox.capacity import Capacity
from relay.outbox.group_commit import StorageError
from relay.outbox.store import Outbox
from relay.pipeline.runner import Pipeline
from relay.reloader import Reloader
from relay.state.redis_store import FAILURES, RedisStore
from relay.state.shared import SharedState
from relay.state.shipper import Shipper
from relay.state.sqlite import UNGROUPED, SqliteState
from relay.tap import routes as tap_routes
from relay.tap.hub import Tap

log = logging.getLogger("relay")


class Relay:
    """The running parts of one relay, started and stopped with the Application."""

    def __init__(self, config: Config) -> None:
        self.config = config
        storage = config.storage
        self.outbox = Outbox(config.database, [u.name for u in config.upstreams],
                             storage.synchronous, Capacity(storage.max_bytes, storage.when_full),
                             additive=(UNGROUPED,))
        self.metrics = Metrics()
        self.store: RedisStore | None = None
        self.state: SqliteState
        if config.state.backend == "redis":
            self.store = RedisStore(config.state, self.metrics)
            self.state = SharedState(config.database, self.store, config.storage.cache_size,
                                     config.state.cache_ms,
                                     hold=config.state.on_unavailable == "hold")
        else:
            self.state = SqliteState(config.database, config.storage.cache_size)
        self.tap = Tap()
        self.metrics.viewers = lambda: len(self.tap.viewers)
        self.ingest = Ingest(config.write_keys, Pipeline(config.rules, config.on_rule_error),
                             self.state, self.outbox, self.metrics,
                             body_seconds=config.limits.body_seconds, tap=self.tap)
        self.forwarders: list[Forwarder] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.reloader = Reloader(config.file, config, self.apply) if config.file else None

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: storage and forwarders up before serving, down after."""
        await self.outbox.open()
        try:
            await self.state.open()
        except BaseException:
            await self.outbox.close()
            raise
        session = aiohttp.ClientSession()
        if self.store is not None:
            assert isinstance(self.state, SharedState)
            shipper = Shipper(self.state, self.store, self.outbox.commit)
            self.state.shipped = shipper.wake
            self.tasks.append(asyncio.create_task(_supervised("state", shipper.run),
                                                  name="ship-state"))
            releaser = Releaser(self.state, self.store, self.outbox, lambda: self.ingest,
                                self.metrics)
            self.tasks.append(asyncio.create_task(_supervised("held messages", releaser.run),
                                                  name="release-held"))
        for upstream in self.config.upstreams:
            forwarder = Forwarder(upstream, self.outbox, session, self.metrics, self.tap)
            self.forwarders.append(forwarder)
            self.tasks.append(asyncio.create_task(
                _supervised(f"upstream {upstream.name}: delivery", forwarder.run),
                name=f"forward-{upstream.name}"))
        if self.reloader is not None:
            self.tasks.append(asyncio.create_task(self.reloader.run(), name="reload"))
        try:
            yield
        finally:
            await self._close(session)

    async def _close(self, session: aiohttp.ClientSession) -> None:
        """Stops the parts, each whatever became of the one before (the database's folder may
        be gone, say): a connection left open would keep its thread, and the process, alive.
        The first failure is raised once all are closed."""
        steps = [self._stop, session.close, self.outbox.close, self.state.close]
        if self.store is not None:
            steps.append(self.store.close)
        failure: BaseException | None = None
        for step in steps:
            try:
                await step()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _stop(self) -> None:
        grace = self.config.shutdown_grace_seconds
        for forwarder in self.forwarders:
            forwarder.stop(grace)
        delivering = {f"forward-{f.upstream.name}" for f in self.forwarders}
        for task in self.tasks:
            if task.get_name() not in delivering:
                task.cancel()  # the reloader, the state's shipper: their work is stored
        _, late = await asyncio.wait(self.tasks, timeout=grace + 1.0) if self.tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            kept = await self.outbox.stats()
        except (StorageError, sqlite3.Error) as exc:
            log.error("stopped: cannot read what is kept for the next start (%s)", exc)
            return
        for waiting in kept:
            if waiting.messages:
                log.info("stopped: %d message(s) for %s kept for the next start",
                         waiting.messages, waiting.upstream)

    def hangup(self) -> None:
        """SIGHUP: the config file is loaded again (relay started from a file always is)."""
        if self.reloader is None:
            log.warning("reload: relay runs without a config file; SIGHUP changes nothing")
        else:
            self.reloader.ask()

    async def queue_stats(self) -> list[outbox_stats.QueueStats]:
        """Each upstream's queue; with workers, of every worker's file."""
        if self.config.workers == 1:
            return await self.outbox.stats()
        return await queue.stats(self.config)

    def apply(self, config: Config) -> None:
        """Takes the rules and write keys of a reloaded config; the next message uses them."""
        self.ingest.pipeline = Pipeline(config.rules, config.on_rule_error)
        self.ingest.write_keys = frozenset(config.write_keys)

    def ready(self) -> dict[str, bool]:
        """What /readyz checks: storage writable and not full, every forwarder running."""
        running = bool(self.tasks) and all(not t.done() for t in self.tasks)
        writable = self.outbox.writable and not self.outbox.capacity.full
        return {"storage": writable, "forwarders": running}

    def log_start(self, port: int) -> None:
        """The start-up line, once relay listens (on `port`, as bound: a test asks for any)."""
        config = self.config
        keys = ", ".join(mask(k) for k in config.write_keys) or "any"
        ups = ", ".join(
            f"{u.name} ({u.kind} {u.url}, key {mask(u.write_key) if u.write_key else 'from SDK'})"
            for u in config.upstreams
        )
        host = f"[{config.host}]" if ":" in config.host else config.host
        log.info("relay: listening on %s:%d; storage %s; write keys %s; %d rule(s); upstreams: %s",
                 host, port, config.database, keys, len(config.rules), ups)
        for note in config.warnings:
            log.warning("%s", note)


async def _supervised(what: str, run: Callable[[], Awaitable[None]]) -> None:
    """Runs a loop until it returns; a bug that escapes it is logged, and it starts again."""
    while True:
        try:
            await run()
            return
        except Exception:
            log.exception("%s loop failed; starting it again", what)
            await asyncio.sleep(1.0)


RELAY = web.AppKey("relay", Relay)
CORS = web.AppKey("cors", cors.Cors)

# Passed to aiohttp's server. Its lingering close (the default) stays on: after an early 413 it
# reads and discards the rest of the body, so the client sees the answer rather than a reset,
# which every SDK would retry forever.
SERVER_OPTIONS: dict[str, Any] = {
    "access_log": None,
    # relay inflates bodies itself, to bound the size and to answer bad encodings with JSON.
    "auto_decompress": False,
}


def build(config: Config, middlewares: Sequence[Any] = ()) -> web.Application:
    """The Application for `config`; storage opens when it starts."""
    app = web.Application(middlewares=middlewares)
    relay = Relay(config)
    app[RELAY] = relay
    app.cleanup_ctx.append(relay.lifecycle)
    app.add_routes(event_routes.routes(relay.ingest))
    _add_browser_parts(app, relay)
    app.add_routes([web.get("/healthz", _healthz)])
    if not config.admin.listen:
        app.add_routes(_operations(relay))
    return app


def build_admin(relay: Relay) -> web.Application:
    """The Application served at `admin.listen`: health, readiness, metrics and /admin/*, over
    the running parts of the main one."""
    app = web.Application()
    app[RELAY] = relay
    app.add_routes([web.get("/healthz", _healthz), *_operations(relay)])
    return app


def _operations(relay: Relay) -> list[web.RouteDef]:
    """What operators ask: readiness, metrics, and /admin/*, the tap and its page when there is
    a token."""
    routes = [web.get("/readyz", _readyz), web.get("/metrics", _metrics)]
    if relay.config.admin.token:
        routes += [web.get("/admin/report", _admin_report), web.get("/admin/queue", _admin_queue),
                   *tap_routes.routes(relay.tap, _authorized, _unauthorized)]
    return routes


def _add_browser_parts(app: web.Application, relay: Relay) -> None:
    """CORS on the inbound routes, the client address behind proxies, and the first-party CDN
    routes when an upstream has a `cdn_url` (the first such upstream serves them)."""
    config = relay.config
    proxies = client_address.Proxies(config.trusted_proxies)
    app[client_address.PROXIES] = proxies
    paths = [route.path for route in segment.routes()]
    origin = next((u for u in config.upstreams if u.cdn_url), None)
    policy = cors.Cors(config.cors, paths, cdn.PREFIXES if origin else ())
    app[CORS] = policy
    app.add_routes(policy.routes())
    app.on_response_prepare.append(policy.on_prepare)
    if origin is not None:
        served = cdn.Cdn(origin, proxies, config.public_host, lambda: relay.ingest.write_keys)
        app.add_routes(served.routes())
        app.on_cleanup.append(served.close)


def _authorized(request: web.Request) -> bool:
    """Whether the request carries the admin token. Digests of equal length are compared, in
    constant time: a wrong token's length tells no more than its bytes do."""
    token = request.app[RELAY].config.admin.token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return hmac.compare_digest(_digest(given.strip()), _digest(token)) \
        and scheme.lower() == "bearer"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _unauthorized() -> web.Response:
    return web.json_response({"code": "unauthorized", "message": "admin needs its bearer token"},
                             status=401, headers={"WWW-Authenticate": "Bearer"})


async def _admin_report(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    relay = request.app[RELAY]
    try:
        built = await report.build(relay.config, relay.store)
    except FAILURES as exc:
        return web.json_response({"code": "state_unavailable",
                                  "message": f"cannot read user state from Redis ({exc})"},
                                 status=503)
    return web.json_response(built)


async def _admin_queue(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    relay = request.app[RELAY]
    queues = await relay.queue_stats()
    paused = {f.upstream.name: f.paused for f in relay.forwarders}
    return web.json_response({"upstreams": [
        {**q.as_dict(), "paused": paused.get(q.upstream, False)} for q in queues]})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    body = relay.metrics.render(await relay.queue_stats())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _readyz(request: web.Request) -> web.Response:
    checks = request.app[RELAY].ready()
    ok = all(checks.values())
    return web.json_response({"ready": ok, **checks}, status=200 if ok else 503)
