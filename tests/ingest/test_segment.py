"""The wire format: parsing, write keys, validation, stamping, outbound batches."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st

from relay import clock
from relay.delivery import vendor_batch
from relay.ingest import segment
from relay.ingest.receipt import Receipt
from relay.ingest.segment import PayloadError, Route

RECEIVED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
TRACK = Route("/v1/track", type="track")
BATCH = Route("/v1/batch", batch=True)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        (f"Basic {b64('WK1:')}", {}, "WK1"),
        (f"Basic {b64('WK1')}", {}, "WK1"),
        ("Basic rawKeyNotBase64!", {}, "rawKeyNotBase64!"),
        ("Basic abcdabcd", {}, "abcdabcd"),
        (None, {"writeKey": "BODY"}, "BODY"),
        ("Bearer token", {"writeKey": "BODY"}, "BODY"),
        (None, {}, ""),
    ],
    ids=["b64-colon", "b64-no-colon", "raw", "raw-that-decodes", "body", "bearer", "none"],
)
def test_write_key_forms(header, body, expected):
    """The write key is read from every Basic form the SDKs use, else from the body."""
    assert segment.write_key(header, body) == expected


def test_decode_refuses_what_is_not_json():
    """Invalid JSON, NaN and out-of-range numbers are a 400, never stored."""
    for body in (b"nope", b'{"a": NaN}', b'{"a": 1e999}', b"\xff\xfe", b"[" * 3000 + b"]" * 3000):
        with pytest.raises(PayloadError) as info:
            segment.decode(body)
        assert info.value.status == 400


def test_envelope_shapes():
    """A batch needs a list of objects; a single call needs an object."""
    assert segment.envelope({"batch": [{"type": "track"}]}, BATCH)[0] == [{"type": "track"}]
    for payload, route in (([], TRACK), ({"batch": {}}, BATCH), ({"batch": [1]}, BATCH)):
        with pytest.raises(PayloadError):
            segment.envelope(payload, route)


def test_batch_context_merges_into_items():
    """Batch-level context and integrations reach every item; the item's own keys win."""
    top = {"context": {"app": "a", "ip": "1"}, "integrations": {"All": False}, "writeKey": "K"}
    item = {"type": "track", "context": {"ip": "2"}, "writeKey": "K", "sentAt": "x"}
    message = segment.message_from(item, segment.shared_of(top, BATCH), BATCH)
    assert message["context"] == {"app": "a", "ip": "2"}
    assert message["integrations"] == {"All": False}
    assert "writeKey" not in message and "sentAt" not in message


def test_single_call_type_comes_from_path():
    """A single call's type is the route's, whatever the body says."""
    assert segment.message_from({"type": "page"}, (), TRACK)["type"] == "track"


def test_batch_fields_that_are_not_objects_are_not_shared():
    """Only a batch's object-valued context and integrations are shared, and only by batches."""
    top = {"context": "nope", "integrations": {"All": False}}
    assert segment.shared_of(top, BATCH) == (("integrations", {"All": False}),)
    assert segment.shared_of(top, TRACK) == ()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "track", "event": "E", "userId": "u"}, None),
        ({"type": "track", "event": "E", "anonymousId": "a", "userId": None}, None),
        ({"type": "track", "event": "E", "userId": 42}, None),
        ({"type": "track", "event": "E"}, "no_user_anon_id"),
        ({"type": "track", "event": "E", "userId": "", "anonymousId": None}, "no_user_anon_id"),
        ({"type": "track", "userId": "u"}, "track_without_event"),
        ({"type": "track", "userId": "u", "event": 3}, "track_without_event"),
        ({"type": "group", "userId": "u"}, "group_without_group_id"),
        ({"type": "alias", "userId": "u"}, "alias_without_ids"),
        ({"type": "alias", "userId": "u", "previousId": "p"}, None),
        ({"type": "launch", "userId": "u"}, "invalid_type"),
    ],
)
def test_invalid_reasons(message, reason):
    """Messages the vendor would silently drop are named with the reason."""
    assert segment.invalid_reason(message) == reason


def test_stamp_corrects_clock_skew():
    """A client clock one hour fast moves the timestamp back by that hour (§1.8)."""
    message = {"timestamp": "2026-11-23T13:00:00.000Z", "messageId": "m1"}
    Receipt(RECEIVED, "2026-11-23T13:00:05Z").stamp(message, message, None)
    assert message["timestamp"] == "2026-11-23T11:59:55.000Z"
    assert message["receivedAt"] == "2026-11-23T12:00:00.000Z"
    assert message["messageId"] == "m1"


def test_stamp_takes_an_items_own_sent_at_over_the_batchs():
    """A batch item with its own sentAt is corrected by that item's skew; the others by the
    batch's."""
    receipt = Receipt(RECEIVED, "2026-11-23T13:00:05Z")  # the batch: a clock an hour fast
    own = {"timestamp": "2026-11-23T11:00:00.000Z"}
    receipt.stamp(own, {"sentAt": "2026-11-23T11:00:05Z"}, None)  # this item: an hour slow
    shared = {"timestamp": "2026-11-23T13:00:00.000Z"}
    receipt.stamp(shared, {}, None)
    unreadable = {"timestamp": "2026-11-23T13:00:00.000Z"}
    receipt.stamp(unreadable, {"sentAt": "soon"}, None)
    assert own["timestamp"] == shared["timestamp"] == "2026-11-23T11:59:55.000Z"
    assert unreadable["timestamp"] == "2026-11-23T13:00:00.000Z"


def test_receive_time_is_whole_milliseconds_and_its_text_matches_it():
    """`clock.now()` is the current time to the millisecond, and `iso` gives the same text for
    it as for any other datetime of that instant, including one made anew after it."""
    before = datetime.now(UTC)
    moment = clock.now()
    after = datetime.now(UTC)
    assert moment.microsecond % 1000 == 0
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= moment <= after
    text = clock.iso(moment)
    assert text == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    assert clock.iso(datetime.fromtimestamp(moment.timestamp(), UTC)) == text
    assert clock.iso(RECEIVED) == "2026-11-23T12:00:00.000Z"


def test_stamp_fills_missing_fields():
    """No timestamp means the receive time; a missing or over-long messageId is replaced."""
    message: dict = {"messageId": "x" * 101}
    Receipt(RECEIVED, None).stamp(message, message, "10.0.0.9")
    assert message["timestamp"] == "2026-11-23T12:00:00.000Z"
    assert message["messageId"].startswith("relay-") and len(message["messageId"]) <= 100
    assert message["context"] == {"ip": "10.0.0.9"}


def test_stamp_keeps_unparseable_timestamp():
    """A timestamp relay cannot read is forwarded as sent, for the vendor to judge."""
    message = {"timestamp": "yesterday"}
    Receipt(RECEIVED, "2026-11-23T13:00:05Z").stamp(message, message, None)
    assert message["timestamp"] == "yesterday"


def test_wants_ip_only_where_the_vendor_would():
    """Browser routes, analytics.js and context.direct get the caller's IP; servers do not."""
    browser = Route("/v1/t", type="track", browser=True)
    assert segment.wants_ip({}, browser)
    assert not segment.wants_ip({"context": {"ip": "1.2.3.4"}}, browser)
    assert not segment.wants_ip({"context": {"library": {"name": "analytics-python"}}}, TRACK)
    assert segment.wants_ip({"context": {"library": {"name": "analytics.js"}}}, TRACK)
    assert segment.wants_ip({"context": {"direct": True}}, TRACK)


def test_batch_body_per_kind():
    """Segment batches carry writeKey in the body; June and RudderStack batches do not."""
    sent = datetime(2026, 1, 1, tzinfo=UTC)
    seg = json.loads(vendor_batch.batch_body("segment", ['{"a":1}', '{"b":2}'], "K", sent))
    assert seg == {"batch": [{"a": 1}, {"b": 2}], "sentAt": clock.iso(sent), "writeKey": "K"}
    june = json.loads(vendor_batch.batch_body("june", ['{"a":1}'], "K", sent))
    assert "writeKey" not in june
    assert vendor_batch.batch_url("june", "http://h/") == "http://h/sdk/batch"
    assert vendor_batch.batch_headers("K")["Authorization"] == "Basic " + b64("K:")
    assert "Authorization" not in vendor_batch.batch_headers("")


def test_budget_bounds_each_message_and_the_request_as_stored():
    """Each stored message is at most 32 KB and a request's all together at most 16x its size
    plus 64 KB; a batch's shared context counts once for every message it is merged into."""
    budget = segment.Budget(1000)
    assert budget.limit == 16 * 1000 + 64 * 1024
    with pytest.raises(PayloadError) as refused:
        budget.admit("x" * (segment.MAX_MESSAGE_BYTES + 1), 3)
    assert (refused.value.status, refused.value.code) == (413, "message_too_large")
    assert "message 3" in refused.value.message
    budget.admit("x" * segment.MAX_MESSAGE_BYTES, 0)
    budget.admit("x" * segment.MAX_MESSAGE_BYTES, 1)
    with pytest.raises(PayloadError) as refused:
        budget.admit("x" * 20_000, 2)
    assert refused.value.code == "request_too_large"
    assert budget.over(segment.MAX_MESSAGE_BYTES + 1) == "message_too_large"
    assert budget.over(20_000) == "request_too_large"
    shared = (("context", {"pad": "A" * 250_000}),)
    with pytest.raises(PayloadError) as refused:
        segment.Budget(250_500).check_shared(shared, 200)
    assert refused.value.code == "message_too_large"
    with pytest.raises(PayloadError) as refused:
        segment.Budget(36_000).check_shared((("context", {"pad": "A" * 30_000}),), 200)
    assert refused.value.code == "request_too_large"
    segment.Budget(36_000).check_shared((("context", {"pad": "A" * 1_000}),), 200)


ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=200)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | ANY_TEXT
    | st.sampled_from([1e15, 9e9, 1e-7, 5e-324, -0.0, 1e300]),
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(ANY_TEXT, inner, max_size=30),
    max_leaves=400).map(lambda value: json.dumps(value, ensure_ascii=False))
# What grows most once stored, as JSON text: numbers written short (1e15 is stored as
# 1000000000000000.0), characters that become \u escapes.
SHORT_NUMBERS = st.lists(st.sampled_from(["1e15", "9e9", "1E14", "2e0"]), max_size=1500).map(
    lambda numbers: "[" + ",".join(numbers) + "]")
ESCAPED = st.text(alphabet="é\u07ff😀€", max_size=1500).map(
    lambda text: json.dumps(text, ensure_ascii=False))


@settings(max_examples=150, deadline=None)
@given(properties=JSON | SHORT_NUMBERS | ESCAPED, timestamp=st.one_of(st.none(), ANY_TEXT),
       message_id=st.one_of(st.none(), ANY_TEXT))
def test_a_request_too_small_to_measure_cannot_store_an_oversized_message(
        properties, timestamp, message_id):
    """What `Budget.measured` takes for granted: a request of n bytes stores a message of at most
    GROWTH * n + STAMP_BYTES bytes before the rules (stored JSON is ASCII, and stamped)."""
    fields = {"userId": "u1", "event": "E"}
    for key, value in (("timestamp", timestamp), ("messageId", message_id)):
        if value is not None:
            fields[key] = value
    sent = (json.dumps(fields, ensure_ascii=False)[:-1] + ',"properties":' + properties
            + "}").encode()
    item = segment.decode(sent)
    message = segment.message_from(item, (), TRACK)
    Receipt(RECEIVED, "2026-11-23T11:59:59.123Z").stamp(message, item, "2001:db8::ffff:1")
    stored = segment.dumps(message)
    target((len(stored) - segment.STAMP_BYTES) / len(sent))
    assert len(stored) <= segment.GROWTH * len(sent) + segment.STAMP_BYTES


def test_routes_cover_the_vendors_paths():
    """Every Segment, browser and June path is served, metrics paths flagged as such."""
    paths = {r.path: r for r in segment.routes()}
    for p in ("/v1/identify", "/v1/track", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias",
              "/v1/batch", "/v1/import", "/v1/i", "/v1/t", "/v1/p", "/v1/s", "/v1/g", "/v1/a",
              "/v1/b", "/sdk/identify", "/sdk/track", "/sdk/page", "/sdk/screen", "/sdk/group",
              "/sdk/alias", "/sdk/batch", "/sdk/b"):
        assert p in paths and not paths[p].metrics
    assert paths["/v1/m"].metrics and paths["/sdk/m"].metrics
    assert paths["/v1/t"].type == "track" and paths["/v1/t"].browser
