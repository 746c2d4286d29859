"""`rename`: moves a field from one dotted path to another."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.options.fields import FieldError
from relay.pipeline import Message, dotted
from relay.pipeline.runner import Drop, RuleContext

_ABSENT = object()


@dataclass(frozen=True)
class Rename:
    """Moves the value at `from` to `to` (replacing what was there); absent `from` is a no-op."""

    from_: str = field(metadata={"key": "from"})
    to: str
    _from: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _to: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, value in (("from", self.from_), ("to", self.to)):
            if not dotted.valid(value):
                raise FieldError(key, f"must be a dotted path like a.b.c; got {value!r}")
        if self.from_ == self.to:
            raise FieldError("to", "must differ from 'from'")
        object.__setattr__(self, "_from", dotted.split(self.from_))
        object.__setattr__(self, "_to", dotted.split(self.to))

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        value = dotted.get(message, self._from, _ABSENT)
        if value is _ABSENT:
            return message
        return dotted.replaced(dotted.removed(message, self._from), self._to, value)
