"""What a viewer is shown of one message: as received and as stored, the rules that changed it
with the dotted paths each changed, or the rule or reason that stopped it.

What a masking rule (`hash`) replaces is never shown in clear: the message as received is shown
through every masking rule of the config, whatever became of the message, and a copy elsewhere
of a value one of them replaced is shown replaced too."""

from __future__ import annotations

from typing import Any

from relay import clock
from relay.logs import mask
from relay.pipeline import Message
from relay.pipeline.runner import Outcome, Pipeline
from relay.tap.hub import CUT, Summary

# Nested deeper than this, a changed value is reported at this depth: payloads are bounded, and
# a path is for reading.
MAX_DEPTH = 8
# Paths listed per rule; the rest are counted (a rule may remove hundreds of properties).
MAX_PATHS = 50
# How deep copies of a replaced value are looked for (the rule's own paths are always masked).
MASK_DEPTH = 64


def summary(message: Message, outcome: str | None = None) -> Summary:
    """What filters see of a message: its fields cut to CUT characters, as filters are."""
    user = message.get("userId") or message.get("anonymousId")
    event = message.get("event")
    kind = message.get("type")
    return Summary(user[:CUT] if isinstance(user, str) else None,
                   kind[:CUT] if isinstance(kind, str) else None,
                   event[:CUT] if isinstance(event, str) else None, outcome)


def traced(pipeline: Pipeline, received: Message, result: Message | Outcome, route: str,
           key: str) -> tuple[Summary, dict[str, Any]]:
    """The record of a message the rules ran on (with `trace`): forwarded or dropped."""
    if not isinstance(result, Outcome):  # no rule changed it
        return _record(masked(pipeline, received), route, key, "forwarded", after=result,
                       changes=[])
    before = masked(pipeline, received, result)
    changes: list[dict[str, Any]] = []
    for effect in result.effects:
        if effect.error is not None:
            changes.append({"rule": effect.step, "paths": [], "error": effect.error[:CUT]})
        elif effect.after is not None:
            paths = changed_paths(effect.before, effect.after)
            change: dict[str, Any] = {"rule": effect.step,
                                      "paths": [p[:CUT] for p in paths[:MAX_PATHS]]}
            if len(paths) > MAX_PATHS:
                change["more"] = len(paths) - MAX_PATHS
            changes.append(change)
    if result.message is None:
        return _record(before, route, key, "dropped", changes=changes,
                       rule=result.dropped_by, reason=result.reason)
    return _record(before, route, key, "forwarded", after=result.message, changes=changes)


def invalid(pipeline: Pipeline, received: Message, route: str, key: str,
            reason: str) -> tuple[Summary, dict[str, Any]]:
    """The record of a message not forwarded because the vendor would drop it."""
    return _record(masked(pipeline, received), route, key, "invalid", changes=[], reason=reason)


def refused(route: str, status: int, code: str, message: str) -> dict[str, Any]:
    """The record of a whole request refused (what it was refused for, never its key)."""
    return {"at": clock.iso(clock.now()), "route": route, "status": status, "code": code,
            "message": message}


def delivery(outcome: str, status: int, detail: str | None = None) -> dict[str, Any]:
    """What an upstream did with a batch (the hub adds each message's id and the upstream)."""
    return {"at": clock.iso(clock.now()), "outcome": outcome, "status": status, "detail": detail}


def masked(pipeline: Pipeline, received: Message, result: Outcome | None = None) -> Message:
    """`received` through every masking rule of `pipeline` (`masked`, on its own paths), and
    with copies of what they replaced in `result`'s trace replaced too."""
    maskers = [step.rule for step in pipeline.steps if getattr(step.rule, "masks_values", False)]
    if not maskers:
        return received
    shown = received
    for rule in maskers:
        shown = rule.masked(shown)  # type: ignore[attr-defined]
    replaced = _replaced(maskers, pipeline, result) if result is not None else {}
    return _masking(shown, replaced, 0) if replaced else shown


def _record(before: Message, route: str, key: str, outcome: str, *, changes: list[Any],
            after: Message | None = None, rule: str | None = None,
            reason: str | None = None) -> tuple[Summary, dict[str, Any]]:
    seen = summary(before, outcome)
    message_id = before.get("messageId")
    return seen, {
        "at": clock.iso(clock.now()), "route": route, "write_key": mask(key),
        "message_id": message_id[:CUT] if isinstance(message_id, str) else None,
        "type": seen.type, "event": seen.event, "user": seen.user, "outcome": outcome,
        "rule": rule, "reason": reason, "before": before, "after": after, "changes": changes}


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


def _replaced(maskers: list[Any], pipeline: Pipeline, result: Outcome) -> dict[str, str]:
    """The strings the masking rules replaced in this trace, each with what replaced it."""
    steps = {step.id for step in pipeline.steps if step.rule in maskers}
    replaced: dict[str, str] = {}
    for effect in result.effects:
        if effect.step in steps and effect.after is not None:
            for path in changed_paths(effect.before, effect.after):
                raw, hashed = _at(effect.before, path), _at(effect.after, path)
                if isinstance(raw, str) and isinstance(hashed, str):
                    replaced[raw] = hashed
    return replaced


def _masking(value: Any, replaced: dict[str, str], depth: int) -> Any:
    if isinstance(value, str):
        return replaced.get(value, value)
    if depth >= MASK_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: _masking(v, replaced, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_masking(v, replaced, depth + 1) for v in value]
    return value


def _at(message: Message, path: str) -> Any:
    value: Any = message
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value
