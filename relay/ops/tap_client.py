"""`relay tap`: the running relay's `/admin/tap` stream, read beside it, one line per event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp

from relay.config.model import Config
from relay.ops.admin_url import admin_url

FILTERS = ("user", "type", "event", "outcome", "upstream")
# A line a person reads: this many rules and paths of each, the rest counted.
MAX_RULES = 3
MAX_PATHS = 5
CONNECT_SECONDS = 5.0
MAX_EVENT_BYTES = 8 * 1024 * 1024  # relay's events are far smaller; a stream is not trusted


class TapError(Exception):
    """Why the stream could not be read (said as is to the user)."""


Event = tuple[str, dict[str, Any]]


async def events(config: Config, filters: dict[str, str]) -> AsyncIterator[Event]:
    """Each event of the stream as (kind, data), until relay ends it (a `bye` is the last)."""
    query = urlencode({k: v for k, v in filters.items() if v})
    url = admin_url(config, "/admin/tap") + (f"?{query}" if query else "")
    auth = {"Authorization": f"Bearer {config.admin.token}"}
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_SECONDS)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, \
                http.get(url, headers=auth, read_bufsize=2**16,
                         max_line_size=MAX_EVENT_BYTES) as response:
            if response.status != 200:
                raise TapError(f"{url.split('?')[0]} answered {response.status}:"
                               f" {(await response.text())[:300]}")
            async for event in _parsed(response.content.readline):
                yield event
    except (aiohttp.ClientError, OSError) as exc:
        raise TapError(f"cannot read {url.split('?')[0]}: {exc}") from exc


async def _parsed(readline: Callable[[], Any]) -> AsyncIterator[Event]:
    """Server-Sent Events: `event:` and `data:` lines, a blank line ending each."""
    kind, data = "message", ""
    while line := (await readline()).decode("utf-8", "replace"):
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads(data)
            kind, data = "message", ""
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def line(kind: str, data: dict[str, Any]) -> str | None:
    """One readable line for an event; None for what people need not see."""
    at = _cut(str(data.get("at", ""))[11:23], 12)
    if kind == "message":
        what = _outcome(data)
        return (f"{at}  {_cut(data.get('type'), 8):<8} {_cut(data.get('event'), 24):<24} "
                f"{_cut(data.get('user'), 20):<20} {what}")
    if kind == "delivery":
        detail = f": {_cut(data.get('detail'), 60)}" if data.get("detail") else ""
        return (f"{at}    {_cut(data.get('message_id'), 40)} -> {_cut(data.get('upstream'), 40)}:"
                f" {_cut(data.get('outcome'), 20)} ({_cut(data.get('status'), 4)}){detail}")
    if kind == "refused":
        return (f"{at}  request to {_cut(data.get('route'), 40)} refused"
                f" {_cut(data.get('status'), 4)} {_cut(data.get('code'), 40)}:"
                f" {_cut(data.get('message'), 80)}")
    if kind == "sampling" and data.get("share", 1.0) < 1.0:
        return (f"(showing {data['share']:.0%} of messages: {data.get('rate')}/s is more than"
                f" {data.get('max_per_second')}/s)")
    return None


def _outcome(data: dict[str, Any]) -> str:
    outcome = str(data.get("outcome"))
    if outcome == "dropped":
        return f"dropped by {_cut(data.get('rule'), 40)}: {_cut(data.get('reason'), 60)}"
    if outcome == "invalid":
        return f"invalid: {_cut(data.get('reason'), 60)}"
    changes = data.get("changes") or []
    changed = "; ".join(f"{_cut(c.get('rule'), 40)} changed {_paths(c)}"
                        for c in changes[:MAX_RULES])
    if len(changes) > MAX_RULES:
        changed += f"; {len(changes) - MAX_RULES} more rule(s)"
    return f"forwarded ({changed})" if changed else _cut(outcome, 20)


def _paths(change: dict[str, Any]) -> str:
    """At most MAX_PATHS of a rule's paths, each cut; how many more."""
    paths = change.get("paths") or ["?"]
    more = len(paths) - MAX_PATHS + int(change.get("more") or 0)
    shown = ", ".join(_cut(p, 40) for p in paths[:MAX_PATHS])
    return shown + (f" and {more} more" if more > 0 else "")


def _cut(value: Any, width: int) -> str:
    """`value` as text of at most `width` characters, control characters shown escaped (a
    payload's text must not drive the terminal)."""
    text = "-" if value is None else str(value)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= width else text[:width - 1] + "…"
