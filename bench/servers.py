"""The servers the benchmark runs as processes of their own, besides relay and nginx.

    python -m bench.servers vendor --port P --control-port C
    python -m bench.servers parse --port P
    python -m bench.servers passthrough --port P --upstream http://127.0.0.1:V

`vendor` is a fake analytics vendor: it parses every POST (with orjson: with `json.loads` the vendor
took ~6 of the ~13 ms each batch of 500 spent in a backlog drain), answers 200, and, for the tags it
was told to watch (`POST /watch?tag=T`; a messageId's tag is the part before its first `-`),
remembers each messageId (of a batch's items, or of a single call) and when it first arrived.
Traffic of other tags (the baselines') is only counted, so the vendor costs them as little as
a real one would. Its control port also answers `GET /stats?tag=T`, `POST /down` (stop
listening and close every connection, so that senders get "connection refused"), `POST /up`,
`POST /check` and `POST /forget?tag=T`. `parse` is the floor of any aiohttp JSON endpoint
(read, `json.loads`, answer); `passthrough` is the simplest aiohttp proxy, forwarding each
request to the vendor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

OK_BODY = '{"success": true}'
MAX_BODY = 8 * 1024 * 1024


class Vendor:
    """Counts unique messageIds per tag; its data port can be stopped and started again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ids: dict[str, dict[str, float]] = {}  # watched tag -> messageId -> first arrival
        self.first: dict[str, float] = {}  # tag -> time.monotonic() of its first new message
        self.last: dict[str, float] = {}  # tag -> time.monotonic() of its last new message
        self.requests = 0
        self.messages = 0
        self.up_since: float | None = None
        self._runner: web.AppRunner | None = None

    async def up(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("POST", "/{tail:.*}", self.receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._runner = runner
        self.up_since = time.monotonic()

    async def down(self) -> None:
        """Closes the listener and every open connection: senders see refused connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.up_since = None

    async def receive(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw)  # what the drain measures is relay, not this parse
        except orjson.JSONDecodeError:  # lone surrogates, which only the stdlib takes
            body = json.loads(raw)
        items = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(items, list):
            items = [body]
        now = time.monotonic()
        self.requests += 1
        self.messages += len(items)
        for item in items:
            mid = item.get("messageId") if isinstance(item, dict) else None
            if isinstance(mid, str):
                tag = mid.partition("-")[0]
                seen = self.ids.get(tag)
                if seen is not None and mid not in seen:
                    seen[mid] = now
                    self.first.setdefault(tag, now)
                    self.last[tag] = now
        return web.Response(text=OK_BODY, content_type="application/json")

    def stats(self, tag: str) -> dict[str, Any]:
        return {"unique": len(self.ids.get(tag, ())), "first": self.first.get(tag),
                "last": self.last.get(tag), "requests": self.requests,
                "messages": self.messages, "up": self.up_since is not None}

    def check(self, tag: str, requests: list[int], per_request: int) -> dict[str, Any]:
        """Of the ids `{tag}-{request}-{i}` of `requests` (the load generator's numbering): how
        many never arrived (with examples), and when the first and the last of them arrived."""
        seen = self.ids.get(tag, {})
        missing: list[str] = []
        times: list[float] = []
        for r in requests:
            for i in range(per_request):
                mid = f"{tag}-{r}-{i}"
                at = seen.get(mid)
                if at is None:
                    missing.append(mid)
                else:
                    times.append(at)
        return {"missing": len(missing), "examples": missing[:5],
                "first": min(times, default=None), "last": max(times, default=None)}


def control_app(vendor: Vendor) -> web.Application:
    """The vendor's control API, on a port of its own that stays up while the vendor is down."""

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(vendor.stats(request.query.get("tag", "")))

    async def down(request: web.Request) -> web.Response:
        await vendor.down()
        return web.json_response({"up": False, "at": time.monotonic()})

    async def up(request: web.Request) -> web.Response:
        await vendor.up()
        return web.json_response({"up": True, "at": vendor.up_since})

    async def check(request: web.Request) -> web.Response:
        ask = await request.json()
        return web.json_response(vendor.check(ask["tag"], ask["requests"], ask["per_request"]))

    async def watch(request: web.Request) -> web.Response:
        vendor.ids.setdefault(request.query.get("tag", ""), {})
        return web.json_response({"watching": request.query.get("tag", "")})

    async def forget(request: web.Request) -> web.Response:
        tag = request.query.get("tag", "")
        vendor.ids.pop(tag, None)
        return web.json_response({"forgotten": tag})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.get("/stats", stats), web.post("/down", down), web.post("/up", up),
                    web.post("/check", check), web.post("/watch", watch),
                    web.post("/forget", forget)])
    return app


async def parse_only(request: web.Request) -> web.Response:
    """Baseline (a): what any aiohttp JSON endpoint pays at least."""
    json.loads(await request.read())
    return web.Response(text=OK_BODY, content_type="application/json")


def passthrough_app(upstream: str) -> web.Application:
    """Baseline (c): each request forwarded to `upstream` as it came; its answer relayed."""
    session: dict[str, aiohttp.ClientSession] = {}

    async def lifecycle(app: web.Application) -> Any:
        session["s"] = aiohttp.ClientSession()
        yield
        await session["s"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-type", "authorization", "content-encoding")}
        async with session["s"].post(upstream + request.path_qs, data=body,
                                     headers=headers) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                content_type=answer.content_type)

    app = web.Application(client_max_size=MAX_BODY)
    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("POST", "/{tail:.*}", forward)
    return app


async def serve(apps: list[tuple[web.Application, int]], vendor: Vendor | None = None) -> None:
    """Serves until SIGTERM or SIGINT."""
    runners = []
    for app, port in apps:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        runners.append(runner)
    if vendor is not None:
        await vendor.up()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if vendor is not None:
        await vendor.down()
    for runner in runners:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["vendor", "parse", "passthrough"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args()
    if args.kind == "vendor":
        vendor = Vendor(args.port)
        asyncio.run(serve([(control_app(vendor), args.control_port)], vendor))
    elif args.kind == "parse":
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("POST", "/{tail:.*}", parse_only)
        asyncio.run(serve([(app, args.port)]))
    else:
        asyncio.run(serve([(passthrough_app(args.upstream), args.port)]))


if __name__ == "__main__":
    main()
