"""`relay try`: a payload through the configured rules, showing what each rule did; nothing is
stored, sent, or remembered."""

from __future__ import annotations

import json
from typing import Any

from relay import clock
from relay.config.model import Config
from relay.ingest import segment
from relay.ingest.receipt import Receipt
from relay.ingest.segment import PayloadError, Route
from relay.pipeline import TYPES
from relay.pipeline.runner import Effect, Outcome, Pipeline, RuleContext
from relay.state.sqlite import SqliteState

_ABSENT = object()


def route_for(payload: Any, path: str | None) -> Route:
    """The route a payload is tried as: `path` if given, else /v1/batch or /v1/<type>."""
    routes = {r.path: r for r in segment.routes()}
    if path is not None:
        if path not in routes or routes[path].metrics:
            raise PayloadError(400, "unknown_route", f"{path} is not an event route of relay")
        return routes[path]
    if isinstance(payload, dict) and "batch" in payload:
        return routes["/v1/batch"]
    kind = payload.get("type") if isinstance(payload, dict) else None
    if kind not in TYPES:
        raise PayloadError(400, "unknown_type", "a single call needs a 'type' (identify, track,"
                           " page, screen, group, alias), or give --route")
    return routes[f"/v1/{kind}"]


async def run(config: Config, body: bytes, path: str | None = None) -> list[str]:
    """The report of trying `body`, one line per entry; PayloadError if it is no payload."""
    payload = segment.decode(body)
    route = route_for(payload, path)
    items, top = segment.envelope(payload, route)
    state = SqliteState(config.storage.path, dry=True)
    await state.open()
    try:
        pipeline = Pipeline(config.rules, config.on_rule_error)
        ctx = RuleContext(state=state, route=route.path)
        lines: list[str] = []
        for index, item in enumerate(items, 1):
            lines += await _one(index, item, top, route, pipeline=pipeline, ctx=ctx)
        return lines
    finally:
        await state.close()


async def _one(index: int, item: dict[str, Any], top: dict[str, Any], route: Route, *,
               pipeline: Pipeline, ctx: RuleContext) -> list[str]:
    message = segment.message_from(item, segment.shared_of(top, route), route)
    reason = segment.invalid_reason(message)
    if reason is not None:
        head = f"message {index} ({message.get('type')}):"
        return [head, f"  not forwarded: the vendor would drop it ({reason})", ""]
    Receipt(clock.now(), top.get("sentAt")).stamp(message, item, None)
    head = f"message {index} ({message['type']}, messageId {message['messageId']}):"
    outcome = await pipeline.run(message, ctx, trace=True)
    return [head, *(_effect(e) for e in outcome.effects), *_result(outcome), ""]


def _effect(effect: Effect) -> str:
    if effect.error is not None:
        return f"  {effect.step}: failed ({effect.error}); message passed on"
    if effect.after is None:
        return f"  {effect.step}: dropped ({effect.reason})"
    changes = "; ".join(diff(effect.before, effect.after)) or "changed"
    return f"  {effect.step}: {changes}"


def _result(outcome: Outcome) -> list[str]:
    if outcome.message is None:
        return [f"  => dropped by {outcome.dropped_by}: {outcome.reason}"]
    if not outcome.effects:
        return ["  => forwarded unchanged by the rules:", *_indent(outcome.message)]
    return ["  => forwarded as:", *_indent(outcome.message)]


def _indent(message: dict[str, Any]) -> list[str]:
    return ["     " + line for line in json.dumps(message, indent=2).splitlines()]


def diff(before: Any, after: Any, prefix: str = "") -> list[str]:
    """What changed between two messages, as `path: old -> new` lines."""
    if before is _ABSENT and isinstance(after, dict) and after:
        before = {}
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for key in [*before, *(k for k in after if k not in before)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            out += diff(before.get(key, _ABSENT), after.get(key, _ABSENT), path)
        return out
    if before is after or (before is not _ABSENT and after is not _ABSENT and before == after
                           and type(before) is type(after)):
        return []
    if before is _ABSENT:
        return [f"set {prefix} = {_short(after)}"]
    if after is _ABSENT:
        return [f"removed {prefix}"]
    return [f"{prefix}: {_short(before)} -> {_short(after)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
