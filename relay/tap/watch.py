"""One request's messages as the tap samples them, recorded while the rules run and published
by ingest once they are stored (a request refused with 503 shows nothing: it comes again)."""

from __future__ import annotations

import dataclasses
from typing import Any

from relay.pipeline import Message
from relay.pipeline.runner import Outcome, Pipeline
from relay.tap import records
from relay.tap.hub import Summary, Tap

Tapped = list[tuple[Summary, dict[str, Any], Any]]


class Watch:
    """One request's messages as the tap samples them, recorded until they are stored."""

    def __init__(self, tap: Tap, tapped: Tapped, route: str, key: str) -> None:
        self.tap = tap
        self.tapped = tapped
        self.route = route
        self.key = key
        self.last: Message | None = None  # the message of the last record

    def traced(self, pipeline: Pipeline, message: Message,
               result: Message | Outcome) -> Message | Outcome:
        seen, record = records.traced(pipeline, message, result, self.route, self.key)
        self.tapped.append((seen, record, message.get("messageId")))
        self.last = message
        return result

    def too_large(self, message: Message, reason: str) -> None:
        """The rules made the last message traced too large to store: it is shown invalid."""
        if self.last is message:
            seen, record, message_id = self.tapped[-1]
            seen = dataclasses.replace(seen, outcome="invalid")
            self.tapped[-1] = (seen, {**record, "outcome": "invalid", "reason": reason},
                               message_id)

    def invalid(self, message: Message, reason: str) -> None:
        seen, record = records.invalid(message, self.route, self.key, reason)
        self.tapped.append((seen, record, message.get("messageId")))
