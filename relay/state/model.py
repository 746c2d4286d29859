"""What rules remember about users, whatever keeps it: the `State` interface they read and
change, the refs users are known by, a user's current group, and the order-free rule that
decides which group call makes a group current (SQLite and Redis decide the same way)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar

from relay import clock


def storable(text: str) -> str:
    """`text` as SQLite and Redis can keep it: JSON allows lone surrogates (`\\ud800`) in ids,
    UTF-8 does not, so each such one is kept as its bytes' escape (`\\xed\\xa0\\x80`). Clean
    text is unchanged, so this may be applied twice."""
    if text.isascii():  # nearly every id: one constant-time test
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")


def user_ref(user_id: str) -> str:
    return f"u:{storable(user_id)}"


def anon_ref(anonymous_id: str) -> str:
    return f"a:{storable(anonymous_id)}"


class Missing(Enum):
    """What a cache gives for a key it does not hold."""

    MISSING = "missing"


MISSING = Missing.MISSING


class NotLoaded(LookupError):
    """A rule read state that `load` was not given the ref of: a bug, reported as the rule's
    failure rather than answered with a guess."""


@dataclass(frozen=True)
class Membership:
    """A user's current group, and the event time that made it current."""

    group_id: str
    at: str


class State(Protocol):
    """The state rules read and change; refs are `u:<userId>` or `a:<anonymousId>`.

    `load` brings what the rules may read about `refs` into memory before they run (one query
    for those not there yet); the rules then read and write synchronously, and their writes
    ride in the outbox's next commit (`drain`). `settle` ends a request's rules.
    """

    async def load(self, refs: Iterable[str]) -> None: ...

    def settle(self) -> None: ...

    def group(self, ref: str) -> Membership | None: ...

    def set_group(self, ref: str, group_id: str, at: str) -> bool: ...

    def is_internal(self, ref: str) -> bool: ...

    def mark_internal(self, refs: Iterable[str], reason: str) -> None: ...

    def link(self, anonymous_id: str, user_id: str) -> None: ...

    def note_member(self, ref: str, group_id: str) -> None: ...

    def note_ungrouped_track(self, ref: str) -> None: ...


V = TypeVar("V")


class Cache(OrderedDict[str, V], Generic[V]):
    """A least-recently-used mapping of at most `size` entries; while `holding` (a request's
    rules run on what was loaded for them), nothing is evicted until `trim`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.holding = False

    def remember(self, key: str, value: V) -> V:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size and not self.holding:
            self.popitem(last=False)
        return value

    def trim(self) -> None:
        """Back to `size` entries, the least recently used evicted; evicting again after."""
        self.holding = False
        while len(self) > self.size:
            self.popitem(last=False)


def wins(group_id: str, at: str, current: Membership) -> bool:
    """Whether a group call of `group_id` at event time `at` makes it the current group over
    `current`: the later event time wins, and the same time goes to the greater group id, so
    that the order the calls arrive in never matters (a shared store decides the same way).
    Event times are `identity.event_time`'s, `YYYY-MM-DDTHH:MM:SS.mmmZ`, whose text sorts as
    the time does; a time in another shape is compared as a time (and never wins unread)."""
    if len(at) == len(current.at) == _EVENT_TIME and at[-1] == current.at[-1] == "Z":
        return (at, group_id) > (current.at, current.group_id)
    a, b = clock.parse(at), clock.parse(current.at)
    if a is None or b is None:
        return b is None
    return (a, group_id) > (b, current.group_id)


_EVENT_TIME = len("2026-01-01T00:00:00.000Z")
