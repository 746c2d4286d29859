"""What a viewer is shown of one message: as received and as stored, the rules that changed it
with the dotted paths each changed, or the rule or reason that stopped it.

Values a `hash` rule replaced are shown hashed everywhere, as received too: a viewer sees no
more than the vendor does."""

from __future__ import annotations

from typing import Any

from relay import clock
from relay.logs import mask
from relay.pipeline import Message
from relay.pipeline.runner import Outcome, Pipeline
from relay.tap.hub import Summary

# Nested deeper than this, a changed value is reported at this depth: payloads are bounded, and
# a path is for reading.
MAX_DEPTH = 8


def summary(message: Message, outcome: str | None = None) -> Summary:
    user = message.get("userId") or message.get("anonymousId")
    event = message.get("event")
    return Summary(user if isinstance(user, str) else None,
                   message.get("type") if isinstance(message.get("type"), str) else None,
                   event if isinstance(event, str) else None, outcome)


def traced(pipeline: Pipeline, received: Message, result: Message | Outcome, route: str,
           key: str) -> tuple[Summary, dict[str, Any]]:
    """The record of a message the rules ran on (with `trace`): forwarded or dropped."""
    if not isinstance(result, Outcome):  # no rule changed it
        return _record(received, route, key, "forwarded", after=result, changes=[])
    masks = _masked(pipeline, result)
    before = _masking(received, masks) if masks != ({}, {}) else received
    changes: list[dict[str, Any]] = []
    for effect in result.effects:
        if effect.error is not None:
            changes.append({"rule": effect.step, "paths": [], "error": effect.error})
        elif effect.after is not None:
            paths = changed_paths(effect.before, effect.after)
            changes.append({"rule": effect.step, "paths": paths})
    if result.message is None:
        return _record(before, route, key, "dropped", changes=changes,
                       rule=result.dropped_by, reason=result.reason)
    return _record(before, route, key, "forwarded", after=result.message, changes=changes)


def invalid(received: Message, route: str, key: str, reason: str) -> tuple[Summary, dict[str, Any]]:
    """The record of a message not forwarded because the vendor would drop it."""
    return _record(received, route, key, "invalid", changes=[], reason=reason)


def refused(route: str, status: int, code: str, message: str) -> dict[str, Any]:
    """The record of a whole request refused (what it was refused for, never its key)."""
    return {"at": clock.iso(clock.now()), "route": route, "status": status, "code": code,
            "message": message}


def delivery(outcome: str, status: int, detail: str | None = None) -> dict[str, Any]:
    """What an upstream did with a batch (the hub adds each message's id and the upstream)."""
    return {"at": clock.iso(clock.now()), "outcome": outcome, "status": status, "detail": detail}


def _record(before: Message, route: str, key: str, outcome: str, *, changes: list[Any],
            after: Message | None = None, rule: str | None = None,
            reason: str | None = None) -> tuple[Summary, dict[str, Any]]:
    seen = summary(before, outcome)
    return seen, {
        "at": clock.iso(clock.now()), "route": route, "write_key": mask(key),
        "message_id": before.get("messageId"), "type": seen.type, "event": seen.event,
        "user": seen.user, "outcome": outcome, "rule": rule, "reason": reason,
        "before": before, "after": after, "changes": changes}


def changed_paths(before: Any, after: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """The dotted paths at which `after` differs from `before` (added, removed or changed)."""
    if before is after:
        return []
    if not (isinstance(before, dict) and isinstance(after, dict)) or depth >= MAX_DEPTH:
        return [] if before == after else [prefix or "."]
    paths: list[str] = []
    for name in (*before, *(k for k in after if k not in before)):
        inner = f"{prefix}.{name}" if prefix else str(name)
        if name not in after or name not in before:
            paths += _leaves(after[name] if name in after else before[name], inner, depth + 1)
        else:
            paths += changed_paths(before[name], after[name], inner, depth + 1)
    return paths


def _leaves(value: Any, prefix: str, depth: int) -> list[str]:
    """The paths of what a whole added or removed value holds (`context.groupId`, not
    `context`)."""
    if not isinstance(value, dict) or not value or depth >= MAX_DEPTH:
        return [prefix]
    return [path for name, inner in value.items()
            for path in _leaves(inner, f"{prefix}.{name}", depth + 1)]


def _masked(pipeline: Pipeline, result: Outcome) -> tuple[dict[str, str], dict[str, str]]:
    """What each rule that masks values (`hash`) replaced: by the string it replaced (so that a
    copy elsewhere in the message is masked too), and by path (any value, numbers included)."""
    masking = {step.id for step in pipeline.steps if getattr(step.rule, "masks_values", False)}
    by_value: dict[str, str] = {}
    by_path: dict[str, str] = {}
    for effect in result.effects:
        if effect.step in masking and effect.after is not None:
            for path in changed_paths(effect.before, effect.after):
                raw, hashed = _at(effect.before, path), _at(effect.after, path)
                if isinstance(hashed, str):
                    by_path[path] = hashed
                    if isinstance(raw, str):
                        by_value[raw] = hashed
    return by_value, by_path


def _masking(value: Any, masks: tuple[dict[str, str], dict[str, str]], path: str = "") -> Any:
    """`value` with every value a masking rule replaced shown as it replaced it."""
    by_value, by_path = masks
    if path in by_path:
        return by_path[path]
    if isinstance(value, str):
        return by_value.get(value, value)
    if isinstance(value, dict):
        return {k: _masking(v, masks, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_masking(v, masks, "") for v in value]
    return value


def _at(message: Message, path: str) -> Any:
    value: Any = message
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value
