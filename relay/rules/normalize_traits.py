"""`normalize_traits`: reserved traits in snake_case or another case become the spec's camelCase."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.pipeline import Message
from relay.pipeline.identity import normal_key
from relay.pipeline.runner import Drop, RuleContext

# The reserved traits of identify and group (Segment spec), as the spec spells them.
RESERVED = (
    "address", "age", "avatar", "birthday", "company", "createdAt", "description", "email",
    "employees", "firstName", "gender", "id", "industry", "lastName", "name", "phone", "plan",
    "title", "username", "website",
)
_CANONICAL = {normal_key(t): t for t in RESERVED}


@dataclass(frozen=True)
class NormalizeTraits:
    """In `traits` and `context.traits`, `created_at`/`CreatedAt`/... become `createdAt`; where
    the camelCase form is also present it wins and the others are removed."""

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        traits = message.get("traits")
        fixed = normalized(traits) if isinstance(traits, dict) else None
        if fixed is not None:
            message = {**message, "traits": fixed}
        context = message.get("context")
        inner = context.get("traits") if isinstance(context, dict) else None
        fixed = normalized(inner) if isinstance(inner, dict) else None
        if fixed is not None:
            message = {**message, "context": {**context, "traits": fixed}}  # type: ignore[dict-item]
        return message


def normalized(traits: dict[str, Any]) -> dict[str, Any] | None:
    """`traits` with reserved names in camelCase, or None when they already are."""
    renames = {}
    for key in traits:
        canonical = _CANONICAL.get(normal_key(str(key)))
        if canonical is not None and canonical != key:
            renames[key] = canonical
    if not renames:
        return None
    out: dict[str, Any] = {}
    for key, value in traits.items():
        target = renames.get(key, key)
        if key in renames and (target in traits or target in out):
            continue  # the spec's own spelling (or an earlier variant) wins
        out[target] = value
    return out
