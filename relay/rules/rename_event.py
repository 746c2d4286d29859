"""`rename_event`: track events named `from` are renamed `to`."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.options.fields import FieldError
from relay.pipeline import Message
from relay.pipeline.runner import Drop, RuleContext


@dataclass(frozen=True)
class RenameEvent:
    """Renames the event of track calls whose event is exactly `from`."""

    from_: str = field(metadata={"key": "from"})
    to: str

    def __post_init__(self) -> None:
        if not self.to:
            raise FieldError("to", "must be a non-empty event name")

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        if message.get("type") != "track" or message.get("event") != self.from_:
            return message
        return {**message, "event": self.to}
