"""A request's clock skew, and event times shifted by it: fast for the times SDKs send.

Every message of a real SDK's batch has a timestamp of its own (to the millisecond or the
microsecond), so a cache keyed by the timestamp misses on nearly every one, and parsing and
formatting each with `datetime` cost ~2.9 µs a message. The shapes SDKs send
(`YYYY-MM-DDTHH:MM:SS`, then `.` and 3 or 6 digits or nothing, then `Z` or `+00:00`) are shifted
here in whole microseconds instead: the text's whole seconds are looked up (a batch's events
share a few seconds), the fraction and the skew added as integers, and the result's whole
seconds looked up as text. Anything else goes to `clock.shifted`, the reference, which gives the
same answer for those shapes too (tests/ingest/test_skew.py holds them to it).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from relay import clock

_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1)
_WHOLE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\Z")
_REMEMBERED = 1024  # whole seconds each cache holds before it starts over (~0.3 MB at most)
# The shapes SDKs send, by length: the suffix, and how many digits follow the seconds' point.
_SHAPES = {20: ("Z", 0), 25: ("+00:00", 0), 24: ("Z", 3), 29: ("+00:00", 3), 27: ("Z", 6),
           32: ("+00:00", 6)}
# Three ASCII digits as microseconds, in thousands or in units: one look-up instead of checking
# and converting the digits (`int` would also take other scripts' digits).
_THOUSANDS = {f"{n:03d}": n * 1000 for n in range(1000)}
_UNITS = {f"{n:03d}": n for n in range(1000)}
_ENDINGS = tuple(f".{n:03d}Z" for n in range(1000))  # a millisecond's text, and the zone

_seconds: dict[str, int | None] = {}  # `YYYY-MM-DDTHH:MM:SS` -> seconds since the epoch
_texts: dict[int, str | None] = {}  # seconds since the epoch -> `YYYY-MM-DDTHH:MM:SS`


class Skew:
    """`receivedAt - sentAt` of one request, which every event time it carries is shifted by."""

    __slots__ = ("delta", "micros")

    def __init__(self, delta: timedelta) -> None:
        self.delta = delta
        self.micros = delta // _MICROSECOND

    def shift(self, timestamp: Any) -> str | None:
        """`clock.shifted(timestamp, delta)`: the event time with the skew removed, or None
        when it is no time relay can read."""
        micros = _micros(timestamp)
        if micros is not None:
            seconds, rest = divmod(micros + self.micros, 1_000_000)
            try:
                whole = _texts[seconds]
            except KeyError:
                whole = _text_of(seconds)
            if whole is not None:
                return whole + _ENDINGS[rest // 1000]
        return clock.shifted(timestamp, self.delta)


def _micros(timestamp: Any) -> int | None:
    """Microseconds since the epoch of a timestamp in one of the shapes SDKs send, else None."""
    shape = _SHAPES.get(len(timestamp)) if timestamp.__class__ is str else None
    if shape is None:
        return None
    suffix, digits = shape
    if not digits:
        if timestamp[19:] != suffix:
            return None
        fraction = 0
    else:
        if timestamp[19] != "." or timestamp[20 + digits:] != suffix:
            return None
        thousands = _THOUSANDS.get(timestamp[20:23])
        units = _UNITS.get(timestamp[23:26]) if digits == 6 else 0
        if thousands is None or units is None:
            return None
        fraction = thousands + units
    whole = timestamp[:19]
    try:
        seconds = _seconds[whole]
    except KeyError:
        seconds = _seconds_of(whole)
    return None if seconds is None else seconds * 1_000_000 + fraction


def _seconds_of(whole: str) -> int | None:
    """`YYYY-MM-DDTHH:MM:SS` (UTC) as seconds since the epoch, remembered; None if no time."""
    seconds = None
    if _WHOLE.match(whole):
        try:
            moment = datetime.fromisoformat(whole)
        except ValueError:
            pass
        else:
            seconds = (moment - _EPOCH) // timedelta(seconds=1)
    if len(_seconds) >= _REMEMBERED:
        _seconds.clear()
    _seconds[whole] = seconds
    return seconds


def _text_of(seconds: int) -> str | None:
    """Seconds since the epoch as `YYYY-MM-DDTHH:MM:SS`, remembered; None past datetime's
    years (the reference then says None too)."""
    try:
        whole: str | None = (_EPOCH + timedelta(seconds=seconds)).isoformat()
    except OverflowError:
        whole = None
    if len(_texts) >= _REMEMBERED:
        _texts.clear()
    _texts[seconds] = whole
    return whole


NONE = Skew(timedelta(0))  # shifts a time by nothing: its text in UTC, to the millisecond


def of(received: datetime, sent_at: Any) -> Skew | None:
    """The skew of a request received at `received` whose client said `sent_at`, or None when
    `sent_at` is no time."""
    sent = clock.parse(sent_at)
    return None if sent is None else Skew(received - sent)
