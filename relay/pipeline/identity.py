"""Who a message is about and when it happened, as the user-state rules need it."""

from __future__ import annotations

import functools
import re
from typing import Any

from relay import clock, skew
from relay.pipeline import Message
from relay.state.model import State, anon_ref, user_ref

_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def text_id(value: Any) -> str | None:
    """An id as the protocol allows it (a non-empty string or a number), as text."""
    if value.__class__ is str:  # nearly every id: no need for the checks below
        return value or None
    if isinstance(value, bool) or value is None or value == "":
        return None
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def refs(message: Message) -> list[str]:
    """The state refs of a message: its userId, then its anonymousId (alias: previousId too)."""
    out = []
    user_id = text_id(message.get("userId"))
    anonymous_id = text_id(message.get("anonymousId"))
    if user_id is not None:
        out.append(user_ref(user_id))
    if anonymous_id is not None:
        out.append(anon_ref(anonymous_id))
    previous = text_id(message.get("previousId")) if message.get("type") == "alias" else None
    if previous is not None:
        out += [user_ref(previous), anon_ref(previous)]
    return out


def primary_ref(message: Message) -> str | None:
    """The ref state is kept under: the userId, else the anonymousId."""
    user_id = text_id(message.get("userId"))
    if user_id is not None:
        return user_ref(user_id)
    anonymous_id = text_id(message.get("anonymousId"))
    return anon_ref(anonymous_id) if anonymous_id is not None else None


def event_time(message: Message) -> str:
    """When the event happened (its timestamp, else when relay received it), as ISO-8601 UTC to
    the millisecond. Read by `relay.skew`'s integer path, shifted by nothing: a timestamp of
    its
    own on every message misses any cache, and `datetime` took ~3 µs a group call."""
    for key in ("timestamp", "receivedAt"):
        text = skew.NONE.shift(message.get(key))
        if text is not None:  # None too for a time before year 1 once in UTC (0001-01-01T00+05)
            return text
    return clock.iso(clock.now())


@functools.lru_cache(maxsize=4096)  # messages repeat a small set of trait and property keys
def normal_key(key: str) -> str:
    """`created_at`, `Created-At` and `createdAt` all as `createdat`."""
    return _NOT_ALNUM.sub("", key.lower())


def emails(message: Message) -> list[str]:
    """Every email on a message: traits, context.traits, properties (any key case), a userId."""
    found: list[str] = []
    context = message.get("context")
    for holder in (message.get("traits"), message.get("properties"),
                   context.get("traits") if isinstance(context, dict) else None):
        if isinstance(holder, dict):
            for key, value in holder.items():
                if isinstance(value, str) and "@" in value and normal_key(str(key)) == "email":
                    found.append(value)
    user_id = message.get("userId")
    if isinstance(user_id, str) and "@" in user_id:
        found.append(user_id)
    return found


def current_group(message: Message, state: State) -> str | None:
    """The group the message's user is in now: by userId, else by anonymousId."""
    return ref_and_group(message, state)[1]


def ref_and_group(message: Message, state: State) -> tuple[str | None, str | None]:
    """`primary_ref` and `current_group` at once, each id read and made a ref once: what every
    ungrouped track needs."""
    user_id = text_id(message.get("userId"))
    ref = None
    if user_id is not None:
        ref = user_ref(user_id)
        membership = state.group(ref)
        if membership is not None:
            return ref, membership.group_id
    anonymous_id = text_id(message.get("anonymousId"))
    if anonymous_id is None:
        return ref, None
    anonymous = anon_ref(anonymous_id)
    membership = state.group(anonymous)
    return ref or anonymous, None if membership is None else membership.group_id
