"""The Segment tracking protocol on the wire: inbound payloads to messages, messages to batches."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from relay.pipeline import TYPES, Message

MAX_MESSAGE_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_WRITE_KEY = 256
_SHORT = {t[0]: t for t in TYPES}


class PayloadError(Exception):
    """A request relay refuses whole: answered with `status` and `{"code", "message"}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Route:
    """What an inbound path carries: one message of `type`, a batch, or metrics."""

    path: str
    type: str | None = None
    batch: bool = False
    metrics: bool = False
    browser: bool = False


def routes() -> list[Route]:
    """Every inbound path relay serves, as the vendors and their SDKs use them."""
    out = [Route(f"/v1/{t}", type=t) for t in sorted(TYPES)]
    out += [Route(f"/v1/{s}", type=t, browser=True) for s, t in sorted(_SHORT.items())]
    out += [Route(f"/sdk/{t}", type=t) for t in sorted(TYPES)]
    out += [Route(p, batch=True) for p in ("/v1/batch", "/v1/import", "/sdk/batch")]
    out += [Route(p, batch=True, browser=True) for p in ("/v1/b", "/sdk/b")]
    out += [Route(p, metrics=True) for p in ("/v1/m", "/sdk/m")]
    return out


def decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before Content-Encoding; a bomb stops at `limit` bytes with a 413."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        # "deflate" is meant to be zlib-wrapped, but some clients send raw deflate.
        wrapped = len(raw) >= 2 and (raw[0] & 0x0F) == 8 and (raw[0] << 8 | raw[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
    else:
        raise PayloadError(415, "unsupported_encoding",
                           f"Content-Encoding {encoding[:40]!r} is not supported; use gzip")
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise PayloadError(400, "invalid_body", f"body is not valid {encoding}: {exc}") from None
    if len(body) > limit:
        raise PayloadError(413, "request_too_large",
                           f"request body is over {limit} bytes once decompressed")
    if not inflater.eof or inflater.unused_data:
        raise PayloadError(400, "invalid_body", f"body is not one complete {encoding} stream")
    return body


def decode(body: bytes) -> Any:
    """The JSON in `body`, whatever Content-Type claimed; PayloadError 400 otherwise.

    orjson first, for speed; the standard library for what orjson refuses but JSON allows (lone
    surrogates). Integers past 64 bits become floats, as they do in the vendors' own (JavaScript)
    number handling.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(400, "invalid_json", f"body is not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def envelope(payload: Any, route: Route) -> tuple[list[Any], dict[str, Any]]:
    """The raw items of a payload and the request-level fields that apply to all of them."""
    if not isinstance(payload, dict):
        raise PayloadError(400, "invalid_payload", "body must be a JSON object")
    if not route.batch:
        return [payload], payload
    items = payload.get("batch")
    if not isinstance(items, list):
        raise PayloadError(400, "invalid_batch", "'batch' must be a list of messages")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PayloadError(400, "invalid_batch", f"batch[{i}] must be a JSON object")
    return items, payload


Shared = tuple[tuple[str, dict[str, Any]], ...]

# What stamping adds to a message at most, as stored: receivedAt, a corrected timestamp, a
# messageId made for it and context.ip.
STAMP_BYTES = 256
# How much larger than it was sent a message can be once stored. Stored JSON is ASCII: a
# character of 2 to 4 bytes of UTF-8 becomes a 6- or 12-byte escape, and a number such as 1e15
# (4 bytes) becomes 1000000000000000.0 (18): at most 4.5 times.
GROWTH = 5
# A request's messages, once stored (in each upstream's queue), take at most this many times
# the request's decompressed size, plus STORED_BASE: a batch's shared context is stored with
# every message, and the rules add to them.
STORED_MULTIPLE = 16
STORED_BASE = 64 * 1024


class Budget:
    """What the messages of one request may take once stored: each at most MAX_MESSAGE_BYTES,
    all together at most STORED_MULTIPLE times the request's size, plus STORED_BASE."""

    __slots__ = ("limit", "measured", "used")

    def __init__(self, size: int) -> None:
        self.limit = STORED_MULTIPLE * size + STORED_BASE
        # Whether a message of this request may be over the limit before any rule ran; when
        # not (most single events), only what the rules make of it is measured.
        self.measured = GROWTH * size + STAMP_BYTES > MAX_MESSAGE_BYTES
        self.used = 0

    def check_shared(self, shared: Shared, count: int) -> None:
        """413 when a batch's shared context and integrations alone, merged into each of its
        `count` messages, would put one or all of them over the limits."""
        if not shared:
            return
        size = len(dumps(dict(shared)))
        if size > MAX_MESSAGE_BYTES:
            raise PayloadError(413, "message_too_large",
                               f"the batch's context and integrations, which every message"
                               f" takes, are over {MAX_MESSAGE_BYTES} bytes")
        if size * count > self.limit:
            raise PayloadError(413, "request_too_large",
                               f"the batch's context and integrations, stored with each of its"
                               f" {count} messages, would take over {self.limit} bytes")

    def admit(self, body: str, index: int) -> None:
        """Counts the stored `body` of message `index` as sent; 413 past either limit."""
        if len(body) > MAX_MESSAGE_BYTES:
            raise PayloadError(413, "message_too_large",
                               f"message {index} is over {MAX_MESSAGE_BYTES} bytes once stored")
        self.used += len(body)
        if self.used > self.limit:
            raise PayloadError(413, "request_too_large",
                               f"the request's messages would take over {self.limit} bytes"
                               f" once stored ({STORED_MULTIPLE}x its size + {STORED_BASE})")

    def over(self, size: int) -> str:
        """Which limit a message of `size` bytes would pass (ingest counts what fits itself,
        inline: a call per message is a tenth of what the check costs)."""
        return "message_too_large" if size > MAX_MESSAGE_BYTES else "request_too_large"


def shared_of(top: dict[str, Any], route: Route) -> Shared:
    """A batch's own `context` and `integrations`, which every item takes (looked up once per
    request, not per message)."""
    if not route.batch:
        return ()
    return tuple((key, top[key]) for key in ("context", "integrations")
                 if isinstance(top.get(key), dict))


def message_from(item: dict[str, Any], shared: Shared, route: Route) -> Message:
    """One item as a message: `type` from a single call's path, the batch's `shared_of` merged
    in (the item's own keys win)."""
    message = dict(item)  # copied whole, then trimmed: cheaper than filtering every key
    message.pop("writeKey", None)  # the request's envelope fields, which relay sets itself
    message.pop("sentAt", None)
    if route.type is not None:
        message["type"] = route.type
    for key, fields in shared:
        own = message.get(key)
        message[key] = {**fields, **own} if isinstance(own, dict) else dict(fields)
    return message


def invalid_reason(message: Message) -> str | None:
    """Why the vendor would silently drop `message`, or None when it is acceptable."""
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in TYPES:
        return "invalid_type"
    if kind == "alias":
        return None if _present(message, "userId") and _present(message, "previousId") \
            else "alias_without_ids"
    if not (_present(message, "userId") or _present(message, "anonymousId")):
        return "no_user_anon_id"
    if kind == "track" and not (isinstance(message.get("event"), str) and message["event"]):
        return "track_without_event"
    if kind == "group" and not _present(message, "groupId"):
        return "group_without_group_id"
    return None


def _present(message: Message, key: str) -> bool:
    value = message.get(key)
    if value.__class__ is str:  # nearly every id: no need for the number checks below
        return value != ""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != ""


def user_key(message: Message) -> str:
    """The id the message's order is kept by: its userId, else its anonymousId."""
    user_id = message.get("userId")
    if user_id.__class__ is str and user_id:  # nearly every message: no loop, no number checks
        return _text(user_id)
    for key in ("userId", "anonymousId"):
        if _present(message, key):
            return _text(str(message[key]))
    return ""


def _text(value: str) -> str:
    """`value` storable as UTF-8: JSON allows lone surrogates (`\\ud800`), SQLite does not."""
    if value.isascii():  # a constant-time test; ASCII has no surrogates to replace
        return value
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def wants_ip(message: Message, route: Route) -> bool:
    """Whether the vendor would fill `context.ip` from the caller: browsers, or `direct: true`."""
    context = message.get("context")
    if not isinstance(context, dict):
        return route.browser
    if "ip" in context:
        return False
    library = context.get("library")
    browser_lib = isinstance(library, dict) and library.get("name") == "analytics.js"
    return route.browser or browser_lib or context.get("direct") is True


def write_key(authorization: str | None, payload: Any) -> str:
    """The SDK's write key: from Basic auth (b64 with or without ':', or raw), else the body."""
    key = _auth_key(authorization) if authorization else ""
    if not key and isinstance(payload, dict) and isinstance(payload.get("writeKey"), str):
        key = payload["writeKey"]
    if len(key) > MAX_WRITE_KEY or not key.isprintable() or _text(key) != key:
        raise PayloadError(400, "invalid_write_key", "the write key is not printable text")
    return key


@functools.lru_cache(maxsize=256)
def _auth_key(authorization: str) -> str:
    """The key in an Authorization header; an SDK sends the same header on every request."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "basic" and value.strip():
        return _basic_key(value.strip())
    return ""


def _basic_key(value: str) -> str:
    try:
        text = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return value
    # A raw key may happen to be valid base64; what it decodes to then is not printable text.
    if not text or not text.isprintable():
        return value
    return text.split(":", 1)[0] if ":" in text else text


def dumps(message: Message) -> str:
    """Compact, ASCII-only JSON for storage and forwarding: its length is its size in bytes, and
    stray surrogates cannot break encoding. orjson where its output is already ASCII."""
    try:
        fast = orjson.dumps(message)
    except TypeError:  # lone surrogates, integers past 64 bits
        fast = b"\x80"
    if fast.isascii():
        return fast.decode("ascii")
    return json.dumps(message, separators=(",", ":"), allow_nan=False)

