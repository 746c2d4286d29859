"""ISO-8601 times as the Segment protocol writes them, and clock-skew correction."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any


def now() -> datetime:
    return datetime.now(UTC)


def datetime_of(seconds: float) -> datetime:
    """A `time.time()` value as an aware datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def parse(value: Any) -> datetime | None:
    """`value` as an aware datetime, or None when it is not an ISO-8601 string."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    return _parse(value)


@functools.lru_cache(maxsize=256)  # a batch's messages share one sentAt, often timestamps too
def _parse(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@functools.lru_cache(maxsize=16)  # every message of a request is stamped with one receive time
def iso(moment: datetime) -> str:
    """`moment` in UTC, millisecond precision, `Z` suffix: what analytics.js sends."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def corrected(timestamp: Any, sent_at: datetime | None, received_at: datetime) -> str | None:
    """The event time with the client's clock skew removed, or None to leave it as sent.

    Segment's documented formula: `timestamp = receivedAt - (sentAt - timestamp)`. Applied
    at receive time, so hours spent in the outbox never shift the event.
    """
    if timestamp is None:
        return iso(received_at)
    moment = parse(timestamp)
    if moment is None or sent_at is None:
        return None
    try:
        return iso(moment + (received_at - sent_at))
    except OverflowError:
        return None
