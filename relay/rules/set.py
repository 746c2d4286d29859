"""`set`: writes a fixed value at a dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.options.fields import FieldError
from relay.pipeline import Message, dotted
from relay.pipeline.runner import Drop, RuleContext


@dataclass(frozen=True)
class SetField:
    """Sets `path` to `value` on every message, creating parent objects as needed."""

    path: str
    value: Any
    _parts: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not dotted.valid(self.path):
            raise FieldError("path", f"must be a dotted path like a.b.c; got {self.path!r}")
        object.__setattr__(self, "_parts", dotted.split(self.path))

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        if dotted.same(dotted.get(message, self._parts, _UNSET), self.value):
            return message
        return dotted.replaced(message, self._parts, self.value)


_UNSET = object()
