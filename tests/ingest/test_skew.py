"""Skew correction: the integer fast path gives exactly what the datetime reference gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay import clock, skew
from relay.skew import Skew

RECEIVED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)

moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59,
                                                                        999999))
fractions = st.sampled_from(["none", "ms", "us", "one digit", "four digits", "nine digits"])
suffixes = st.sampled_from(["Z", "+00:00", "-00:00", "+02:00", "", "z", " Z", "+0000"])
skews = st.timedeltas(min_value=timedelta(days=-40_000), max_value=timedelta(days=40_000))


def written(moment: datetime, fraction: str, suffix: str, separator: str = "T") -> str:
    """`moment` as an SDK (or a broken one) might write it."""
    digits = {"none": "", "ms": f".{moment.microsecond // 1000:03d}",
              "us": f".{moment.microsecond:06d}", "one digit": f".{moment.microsecond // 100000}",
              "four digits": f".{moment.microsecond // 100:04d}",
              "nine digits": f".{moment.microsecond:06d}123"}[fraction]
    return moment.strftime(f"%Y-%m-%d{separator}%H:%M:%S").zfill(19) + digits + suffix


@settings(max_examples=3000, deadline=None)
@given(moments, fractions, suffixes, skews, st.sampled_from(["T", " ", "t"]))
@example(datetime(9999, 12, 31, 23, 59, 59, 999000), "ms", "Z", timedelta(milliseconds=1), "T")
@example(datetime(1, 1, 1, 0, 0, 0, 0), "ms", "Z", timedelta(microseconds=-1), "T")
@example(datetime(1969, 12, 31, 23, 59, 59, 999999), "us", "+00:00", timedelta(0), "T")
@example(datetime(2024, 2, 29, 23, 59, 59, 999500), "us", "Z", timedelta(microseconds=500), "T")
@example(datetime(2026, 12, 7, 4, 0, 0, 123456), "us", "+02:00", timedelta(0), "T")
@example(datetime(1, 1, 1, 0, 0, 0, 0), "none", "+05:00", timedelta(0), "T")
def test_fast_path_matches_the_reference(moment, fraction, suffix, delta, separator):
    """For any time an SDK may write (and near misses of that shape), and any skew, `Skew.shift`
    gives what `clock.shifted` gives: the same text, or None for both."""
    text = written(moment, fraction, suffix, separator)
    assert Skew(delta).shift(text) == clock.shifted(text, delta)


@pytest.mark.parametrize("text", [
    "2024-13-01T00:00:00.000Z", "2024-02-30T00:00:00.000Z", "2024-05-01T24:00:00.000Z",
    "2024-05-01T12:00:60.000Z", "2024-05-01T12:00:00.0a0Z",
    "2024-05-01T12:00:00.\u0661\u0662\u0663Z",
    "\u0662024-05-01T12:00:00.000Z", "2024-05-01T12:00:00.000", "2024-05-01T12:00:00.+00:00",
    "20240501T120000.123Z", "2024-05-01T12:00:00.123456789+00:00", "", "Z", "soon", 17, None,
    "2024-05-01T12:00:00.000Z" + " " * 40,
])
def test_what_is_no_time_or_not_the_usual_shape_goes_as_the_reference_says(text):
    """Impossible dates, non-ASCII digits, other shapes and non-strings: the same answer as
    the reference (None where it cannot read the time)."""
    delta = timedelta(seconds=-3600)
    assert Skew(delta).shift(text) == clock.shifted(text, delta)


def test_a_batch_of_distinct_times_is_shifted_each_by_the_skew():
    """A clock an hour fast moves each of a batch's millisecond timestamps back by that hour."""
    late = skew.of(RECEIVED, "2026-11-23T13:00:05.000Z")
    assert late is not None
    times = [f"2026-11-23T13:00:0{i}.{i * 111:03d}Z" for i in range(5)]
    assert [late.shift(t) for t in times] == [
        f"2026-11-23T11:59:5{5 + i}.{i * 111:03d}Z" for i in range(5)]


def test_no_sent_at_is_no_skew():
    """A request without a readable sentAt has no skew to correct by."""
    assert skew.of(RECEIVED, None) is None
    assert skew.of(RECEIVED, "yesterday") is None


@pytest.mark.parametrize(("text", "micros"), [
    ("1970-01-01T00:00:01.500Z", 1_500_000),
    ("2026-11-23T12:00:00.000001+00:00", 1_795_435_200_000_001),
    ("1969-12-31T23:59:59Z", -1_000_000),
])
def test_the_shapes_sdks_send_take_the_integer_path(text, micros):
    """Millisecond `Z` times (analytics.js, analytics-node) and microsecond `+00:00` times (the
    Python SDKs) are read as integers, not handed to the reference."""
    assert skew._micros(text) == micros
