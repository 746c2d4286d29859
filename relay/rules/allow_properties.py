"""`allow_properties`: per event name, keep only the listed properties."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.options.fields import FieldError
from relay.pipeline import Message
from relay.pipeline.runner import Drop, RuleContext


@dataclass(frozen=True)
class AllowProperties:
    """For track calls whose event matches a key of `events` (a name or glob), every property
    not listed for it is removed; other events pass untouched. The first matching key applies."""

    events: Mapping[str, tuple[str, ...]]
    _patterns: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.events:
            raise FieldError("events", "must map at least one event name to its properties")
        patterns = tuple((re.compile(fnmatch.translate(name)), frozenset(allowed))
                         for name, allowed in self.events.items())
        object.__setattr__(self, "_patterns", patterns)

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        event = message.get("event")
        properties = message.get("properties")
        if message.get("type") != "track" or not isinstance(event, str) \
                or not isinstance(properties, dict):
            return message
        for pattern, allowed in self._patterns:
            if pattern.match(event):
                kept = {k: v for k, v in properties.items() if k in allowed}
                return message if len(kept) == len(properties) else {**message, "properties": kept}
        return message
