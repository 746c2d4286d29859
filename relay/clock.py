"""ISO-8601 times as the Segment protocol writes them, and clock-skew correction."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

_LONGEST = 64  # characters of a time string worth parsing


def now() -> datetime:
    return datetime.now(UTC)


def datetime_of(seconds: float) -> datetime:
    """A `time.time()` value as an aware datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def parse(value: Any) -> datetime | None:
    """`value` as an aware datetime, or None when it is not an ISO-8601 string."""
    if not isinstance(value, str) or len(value) > _LONGEST:
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
    return _iso(moment)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def corrected(timestamp: Any, sent_at: datetime | None, received_at: datetime) -> str | None:
    """The event time with the client's clock skew removed, or None to leave it as sent.

    Segment's documented formula: `timestamp = receivedAt - (sentAt - timestamp)`. Applied
    at receive time, so hours spent in the outbox never shift the event.
    """
    if timestamp is None:
        return iso(received_at)
    if sent_at is None or not isinstance(timestamp, str) or len(timestamp) > _LONGEST:
        return None
    return _shifted(timestamp, received_at - sent_at)


# Keyed by the skew, which a batch's messages share: a key that hashes far faster than the
# shifted datetime would as `iso`'s key.
@functools.lru_cache(maxsize=256)
def _shifted(timestamp: str, skew: timedelta) -> str | None:
    moment = _parse(timestamp)
    if moment is None:
        return None
    try:
        return _iso(moment + skew)
    except OverflowError:
        return None
