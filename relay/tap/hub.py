"""Where tapped events meet their viewers: a bounded ring of recent ones, per-viewer queues that
drop a viewer who does not read rather than buffer for it, and sampling above a readable rate.

Ingest and delivery read `Tap.watching` (one attribute) and do nothing more while it is False:
with no viewer, the tap costs a message nothing else."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What a new viewer is shown first: the latest events, up to a count and a size.
RING_EVENTS = 200
RING_BYTES = 4 * 1024 * 1024
# Queued for one viewer at most; past it the viewer is dropped (its stream ends, saying why).
VIEWER_BYTES = 1024 * 1024
# Handed to a viewer's socket at once: what its transport buffers while the viewer is slow.
WRITE_BYTES = 64 * 1024
MAX_VIEWERS = 16
# Messages a second that viewers are shown in full; above it, an even share of them. A person
# reads a few a second; a page renders a few hundred; tracing costs ingest ~40 µs a message.
MAX_PER_SECOND = 50
# Delivery events follow the messages shown: the ids of this many are remembered.
REMEMBERED = 2000
# Filters and what they are matched against are at most this many characters; a payload's
# longer user or event name is matched on its start (and a glob's cost stays bounded).
CUT = 200
# One event's most: larger, its message as received and as stored are left out, so that one
# hostile message can neither fill a viewer's queue nor the ring.
MAX_EVENT_BYTES = 128 * 1024


@dataclass(frozen=True)
class Summary:
    """What filters look at: a message's user (userId, else anonymousId), type and event name,
    and once known its outcome, or the upstream of a delivery."""

    user: str | None
    type: str | None
    event: str | None
    outcome: str | None = None
    upstream: str | None = None


@dataclass(frozen=True)
class Filters:
    """A viewer's query: exact user, type, outcome and upstream; `event` a glob (`Report *`).
    An empty field admits everything."""

    user: str = ""
    type: str = ""
    event: str = ""
    outcome: str = ""
    upstream: str = ""

    def wants(self, user: Any, kind: Any, event: Any) -> bool:
        """Whether a message with these fields, as received, may be shown (before its outcome)."""
        return ((not self.user or user == self.user
                 or (isinstance(user, str) and len(user) > CUT and user[:CUT] == self.user))
                and (not self.type or kind == self.type)
                and (not self.event or (isinstance(event, str)
                                        and fnmatch.fnmatchcase(event[:CUT], self.event))))

    def admits(self, seen: Summary) -> bool:
        """Whether an event about a message summarised by `seen` is shown."""
        if seen.upstream is not None and self.upstream and seen.upstream != self.upstream:
            return False
        if seen.upstream is None and self.outcome and seen.outcome != self.outcome:
            return False
        return self.wants(seen.user, seen.type, seen.event)


class Viewer:
    """One open stream: what is queued for it, and why it was dropped if it was."""

    def __init__(self, filters: Filters) -> None:
        self.filters = filters
        self.queue: deque[bytes] = deque()
        self.size = 0
        self.dropped = ""
        self.fell_behind = False
        self.ready = asyncio.Event()
        self.ended = asyncio.Event()  # set with `dropped`: a write waiting on it stops waiting

    def offer(self, chunk: bytes) -> None:
        if self.dropped:
            return
        if self.size + len(chunk) > VIEWER_BYTES:
            self.fell_behind = True
            self.drop("fell behind: relay does not buffer for a viewer that does not read")
        else:
            self.queue.append(chunk)
            self.size += len(chunk)
        self.ready.set()

    def drop(self, reason: str) -> None:
        self.dropped = reason
        self.queue.clear()
        self.size = 0
        self.ready.set()
        self.ended.set()

    def take(self) -> bytes:
        """The oldest queued events, about WRITE_BYTES of them (one at least)."""
        taken: list[bytes] = []
        size = 0
        while self.queue and (not taken or size + len(self.queue[0]) <= WRITE_BYTES):
            chunk = self.queue.popleft()
            taken.append(chunk)
            size += len(chunk)
        self.size -= size
        if not self.queue:
            self.ready.clear()
        return b"".join(taken)


class Tap:
    """The viewers of one relay process, and what they are shown."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.viewers: set[Viewer] = set()
        self.watching = False
        self.share = 1.0  # of wanted messages shown; below 1 while the rate is above the cap
        self._ring: deque[tuple[Summary, bytes]] = deque()
        self._ring_bytes = 0
        # The messages shown, with each upstream's last outcome for them: a delivery event is
        # published when it changes (a batch retried for an hour is one `retrying`, not 60).
        # Keyed by the hash of (user key, messageId) as stored: a client's id alone may collide
        # with another user's; the id itself is kept cut to CUT characters.
        self._shown: OrderedDict[int, tuple[Summary, str, dict[str, str]]] = OrderedDict()
        self._seq = 0
        self.open = 0  # streams not yet ended, the dropped ones too: what MAX_VIEWERS counts
        self._everyone = False  # some viewer filters on nothing a message is wanted by
        self._second = 0
        self._wanted = 0  # messages some viewer wanted in the current second
        self._traced = 0  # of them, traced
        self._credit = 0.0

    def join(self, filters: Filters) -> Viewer | None:
        """A new viewer, first given the ring's events it admits; None when there are already
        MAX_VIEWERS."""
        if self.open >= MAX_VIEWERS:
            return None
        self.open += 1
        viewer = Viewer(filters)
        viewer.offer(self._chunk("sampling", self._sampling()))
        recent: list[bytes] = []  # the newest of the ring that fill half its queue at most
        room = VIEWER_BYTES // 2
        for seen, chunk in reversed(self._ring):
            if filters.admits(seen):
                if len(chunk) > room:
                    break
                recent.append(chunk)
                room -= len(chunk)
        for chunk in reversed(recent):
            viewer.offer(chunk)
        self.viewers.add(viewer)
        self.watching = True
        self._everyone = self._everyone or not (filters.user or filters.type or filters.event)
        return viewer

    def close(self, reason: str) -> None:
        """Ends every viewer's stream, saying why (relay is stopping)."""
        for viewer in self.viewers:
            viewer.drop(reason)

    def closed(self, viewer: Viewer) -> None:
        """A viewer's stream has ended."""
        self.open -= 1
        self.leave(viewer)

    def leave(self, viewer: Viewer) -> None:
        """A viewer is shown nothing more (its stream may take a moment to end)."""
        self.viewers.discard(viewer)
        self.watching = bool(self.viewers)
        self._everyone = any(not (v.filters.user or v.filters.type or v.filters.event)
                             for v in self.viewers)
        if not self.watching:  # what nobody watches is not kept
            self._ring.clear()
            self._ring_bytes = 0
            self._shown.clear()

    def sample(self, message: dict[str, Any]) -> bool:
        """Whether this message, as received, is traced and shown: some viewer wants it, it
        falls in the shown share of this second's wanted messages, and fewer than
        MAX_PER_SECOND were traced this second (the share is the last second's: a burst's first
        second would otherwise be traced whole)."""
        if not self._everyone:
            user = message.get("userId") or message.get("anonymousId")
            if not any(v.filters.wants(user, message.get("type"), message.get("event"))
                       for v in self.viewers):
                return False
        second = int(self.clock())
        if second != self._second:
            self._next_second(second)
        self._wanted += 1
        self._credit += self.share
        if self._credit < 1.0 or self._traced >= MAX_PER_SECOND:
            return False
        self._credit -= 1.0
        self._traced += 1
        return True

    def _next_second(self, second: int) -> None:
        """The share for the second starting now, from the rate of the one before."""
        rate = self._wanted if second == self._second + 1 else 0
        share = 1.0 if rate <= MAX_PER_SECOND else round(MAX_PER_SECOND / rate, 3)
        self._second, self._wanted, self._traced = second, 0, 0
        if share != self.share:
            self.share = share
            self._broadcast(Summary(None, None, None), self._chunk("sampling",
                                                                   self._sampling(rate)))

    def message(self, seen: Summary, record: dict[str, Any], key: int | None) -> None:
        """A message's record (`relay.tap.records`), to the viewers it is for and the ring;
        `key` (of a stored message: `shown_key`) to follow its delivery by."""
        if key is not None:
            self._shown[key] = (seen, str(record.get("message_id")), {})
            if len(self._shown) > REMEMBERED:
                self._shown.popitem(last=False)
        self._publish(seen, "message", {**record, "sampled": self.share})

    def refused(self, record: dict[str, Any]) -> None:
        """A whole request refused: shown to viewers that filter on nothing a request lacks."""
        self._publish(Summary(None, None, None, outcome="refused"), "refused", record)

    def delivery(self, upstream: str, keys: list[int], record: dict[str, Any]) -> None:
        """What an upstream did with a batch (the `shown_key` of each of its messages): an
        event per message shown whose outcome there changed."""
        outcome = record["outcome"]
        for key in keys:
            shown = self._shown.get(key)
            if shown is None or shown[2].get(upstream) == outcome:
                continue
            seen, message_id, outcomes = shown
            outcomes[upstream] = outcome
            self._publish(Summary(seen.user, seen.type, seen.event, upstream=upstream),
                          "delivery", {**record, "message_id": message_id, "upstream": upstream})

    def _publish(self, seen: Summary, kind: str, record: dict[str, Any]) -> None:
        chunk = self._chunk(kind, record)
        self._broadcast(seen, chunk)
        self._ring.append((seen, chunk))
        self._ring_bytes += len(chunk)
        while len(self._ring) > RING_EVENTS or self._ring_bytes > RING_BYTES:
            self._ring_bytes -= len(self._ring.popleft()[1])

    def _broadcast(self, seen: Summary, chunk: bytes) -> None:
        everyone = seen.user is None and seen.type is None and seen.outcome is None
        dropped = []
        for viewer in self.viewers:
            if everyone or viewer.filters.admits(seen):
                viewer.offer(chunk)
                if viewer.dropped:
                    dropped.append(viewer)
        for viewer in dropped:  # no longer watching, though its stream takes a moment to end
            self.leave(viewer)

    def _chunk(self, kind: str, record: dict[str, Any]) -> bytes:
        """One Server-Sent Event. ASCII JSON: a message's lone surrogates stay escaped."""
        self._seq += 1
        record = {"seq": self._seq, **record}
        data = _json(record)
        if data is None or len(data) > MAX_EVENT_BYTES:
            note = {"omitted": f"more than the tap shows ({MAX_EVENT_BYTES // 1024} KB as JSON)"
                    if data is not None else "nested too deeply to show"}
            record = {**record, "before": note, "after": note if record.get("after") else None,
                      "changes": record.get("changes", [])[:1]}
            data = _json(record) or json.dumps({"seq": self._seq, "omitted": True})
        return f"id: {self._seq}\nevent: {kind}\ndata: {data}\n\n".encode()

    def _sampling(self, rate: float | None = None) -> dict[str, Any]:
        return {"share": self.share, "rate": rate, "max_per_second": MAX_PER_SECOND}


def shown_key(user_key: str, message_id: Any) -> int:
    """What a stored message's delivery is followed by: its user key and its messageId."""
    return hash((user_key, message_id))


def _json(record: dict[str, Any]) -> str | None:
    try:
        return json.dumps(record)
    except (RecursionError, ValueError, TypeError):
        return None
