"""One request's messages as the tap samples them, recorded while the rules run and published
by ingest once they are stored (a request refused with 503 shows nothing: it comes again).

Nothing here may change what happens to a message: a record that cannot be made (a payload
nested too deeply to walk, say) is logged and left out, never raised into ingest."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from relay.pipeline import Message
from relay.pipeline.runner import Outcome, Pipeline
from relay.tap import records
from relay.tap.hub import Summary, Tap, shown_key

log = logging.getLogger("relay.tap")

# A record, and the key its delivery is followed by once it is stored (None: not followed).
Tapped = list[tuple[Summary, dict[str, Any], int | None]]


class Watch:
    """What the tap samples of one request's messages, until they are stored."""

    def __init__(self, tap: Tap, route: str, key: str, pipeline: Pipeline) -> None:
        self.tap = tap
        self.tapped: Tapped = []
        self.route = route
        self.key = key
        self.pipeline = pipeline
        self.last: Message | None = None  # the message of the last record

    def traced(self, message: Message, result: Message | Outcome) -> Message | Outcome:
        """Records what the rules did to `message` (run with `trace`); `result` unchanged."""
        try:
            seen, record = records.traced(self.pipeline, message, result, self.route,
                                          self.key)
        except Exception as exc:  # the tap must never fail a message
            _failed(exc)
            return result
        self.tapped.append((seen, record, None))
        self.last = message
        return result

    def stored(self, message: Message, user_key: str) -> None:
        """The last message traced is stored under `user_key`: its delivery is followed."""
        if self.last is message:
            seen, record, _ = self.tapped[-1]
            self.tapped[-1] = (seen, record, shown_key(user_key, message.get("messageId")))

    def too_large(self, message: Message, reason: str) -> None:
        """The rules made the last message traced too large to store: it is shown invalid."""
        if self.last is message:
            seen, record, key = self.tapped[-1]
            seen = dataclasses.replace(seen, outcome="invalid")
            self.tapped[-1] = (seen, {**record, "outcome": "invalid", "reason": reason}, key)

    def invalid(self, message: Message, reason: str) -> None:
        try:
            seen, record = records.invalid(self.pipeline, message, self.route, self.key, reason)
        except Exception as exc:  # the tap must never fail a message
            _failed(exc)
            return
        self.tapped.append((seen, record, None))

    def publish(self) -> None:
        """The request's records, once its messages are stored."""
        for seen, record, key in self.tapped:
            try:
                self.tap.message(seen, record, key)
            except Exception as exc:  # stored already: the answer is 200
                _failed(exc)


FAILURE_LOG_SECONDS = 60.0
_last_log = [-FAILURE_LOG_SECONDS]


def _failed(exc: Exception) -> None:
    """One line a minute at most: the messages are hostile input, and sampled."""
    now = time.monotonic()
    if now - _last_log[0] >= FAILURE_LOG_SECONDS:
        _last_log[0] = now
        log.warning("tap: a message could not be shown (%s: %s)", type(exc).__name__,
                    str(exc)[:200])
