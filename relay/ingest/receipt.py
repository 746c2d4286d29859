"""A request's receipt: when relay received it and the clock skew its `sentAt` shows, which
every message of the request is stamped with (worked out once per request, not per message)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from relay import clock, skew

MAX_MESSAGE_ID = 100


class Receipt:
    """Stamps the messages of one request received at `received`, whose envelope (a batch's
    top level) says `sent_at`."""

    __slots__ = ("received", "received_text", "sent_at", "skew")

    def __init__(self, received: datetime, sent_at: Any) -> None:
        self.received = received
        self.received_text = clock.iso(received)
        self.sent_at = sent_at
        self.skew = skew.of(received, sent_at)

    def stamp(self, message: dict[str, Any], item: dict[str, Any], ip: str | None) -> None:
        """`message`, made of `item` as sent: messageId kept (made when missing), receivedAt
        set, timestamp corrected for the skew of the item's own sentAt, else the envelope's,
        and the caller's `ip` added."""
        mid = message.get("messageId")
        if not isinstance(mid, str) or not mid or len(mid) > MAX_MESSAGE_ID:
            message["messageId"] = f"relay-{uuid.uuid4()}"
        message["receivedAt"] = self.received_text
        timestamp = message.get("timestamp")
        if timestamp is None:
            message["timestamp"] = self.received_text
        else:
            sent_at = item.get("sentAt", self.sent_at)
            own = self.skew if sent_at is self.sent_at else skew.of(self.received, sent_at)
            fixed = None if own is None else own.shift(timestamp)
            if fixed is not None:
                message["timestamp"] = fixed
        if ip is not None:
            context = message.get("context")
            if not isinstance(context, dict):
                context = message["context"] = {}
            context.setdefault("ip", ip)
