"""`remove`: deletes fields at dotted dotted."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.options.fields import FieldError
from relay.pipeline import Message, dotted
from relay.pipeline.runner import Drop, RuleContext


@dataclass(frozen=True)
class Remove:
    """Removes each of `paths` where present; absent paths are left alone."""

    paths: tuple[str, ...]
    _parts: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.paths:
            raise FieldError("paths", "must list at least one dotted path")
        for path in self.paths:
            if not dotted.valid(path):
                raise FieldError("paths", f"each must be a dotted path; got {path!r}")
        object.__setattr__(self, "_parts", tuple(dotted.split(p) for p in self.paths))

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        for parts in self._parts:
            message = dotted.removed(message, parts)
        return message
