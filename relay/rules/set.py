"""`set`: writes a fixed value at a dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay import paths
from relay.pipeline import Drop, Message, RuleContext
from relay.schema import FieldError


@dataclass(frozen=True)
class SetField:
    """Sets `path` to `value` on every message, creating parent objects as needed."""

    path: str
    value: Any
    _parts: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not paths.valid(self.path):
            raise FieldError("path", f"must be a dotted path like a.b.c; got {self.path!r}")
        object.__setattr__(self, "_parts", paths.split(self.path))

    async def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        return self.apply_now(message, ctx)

    def apply_now(self, message: Message, ctx: RuleContext) -> Message | Drop:
        if paths.same(paths.get(message, self._parts, _UNSET), self.value):
            return message
        return paths.replaced(message, self._parts, self.value)


_UNSET = object()
