"""`drop`: drops the messages its `when:` matches."""

from __future__ import annotations

from dataclasses import dataclass

from relay.pipeline import Message
from relay.pipeline.runner import Drop, RuleContext


@dataclass(frozen=True)
class DropMatching:
    """Drops every message it is applied to; its `when:` (required) says which."""

    needs_when = True

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        return Drop("matched")
