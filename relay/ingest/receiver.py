"""A request's messages, from its body as sent to its answer: limits, auth, decoding, the rules,
and 200 only once what is left is stored. No HTTP here: `relay.http` hands over the route, the
headers that matter and the body, and writes the `Answer`."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from relay import clock
from relay.ingest import held, segment
from relay.ingest.receipt import Receipt
from relay.ingest.segment import PayloadError, Route
from relay.logs import mask
from relay.metrics import Metrics, Tally
from relay.outbox.group_commit import StorageError
from relay.outbox.store import Entry, Outbox
from relay.pipeline import Message
from relay.pipeline.runner import Pipeline, RuleContext
from relay.state.shared import SharedState
from relay.state.sqlite import SqliteState
from relay.tap import records
from relay.tap.hub import Tap
from relay.tap.watch import Watch

log = logging.getLogger("relay.ingest")


OK = b'{"success": true}'
STORAGE_RETRY_AFTER = "5"

@dataclass(frozen=True)
class Answer:
    """What an SDK request is answered: status, JSON body, extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def error(status: int, code: str, message: str, **headers: str) -> Answer:
        """An error answer as every SDK logs it: `{"code", "message"}`."""
        body = json.dumps({"code": code, "message": message}).encode()
        return Answer(status, body, tuple(headers.items()))

    def with_headers(self, extra: tuple[tuple[str, str], ...]) -> Answer:
        return Answer(self.status, self.body, self.headers + extra) if extra else self


OK_ANSWER = Answer(200, OK)


class Ingest:
    """Turns SDK requests into stored messages, for every route of `segment.routes()`."""

    def __init__(self, write_keys: tuple[str, ...], pipeline: Pipeline, state: SqliteState,
                 outbox: Outbox, metrics: Metrics, *, body_seconds: float,
                 tap: Tap | None = None) -> None:
        self.write_keys = frozenset(write_keys)
        self.pipeline = pipeline  # replaced whole on reload; a request keeps the one it began with
        self.state = state
        self.shared = state if isinstance(state, SharedState) else None
        self.outbox = outbox
        self.metrics = metrics
        self.body_seconds = body_seconds
        self.tap = tap or Tap()

    async def answer(self, route: Route, raw: bytes, encoding: str, authorization: str | None,
                     remote: str | None) -> Answer:
        """The answer to one SDK request whose body (as sent) has been read whole: 200 only
        once its messages are committed."""
        started = time.perf_counter()
        try:
            await self.accept(route, raw, encoding, authorization, remote)
            answer = OK_ANSWER
        except PayloadError as exc:
            answer = Answer.error(exc.status, exc.code, exc.message)
            if self.tap.watching:
                self.tap.refused(records.refused(route.path, exc.status, exc.code, exc.message))
        except StorageError as exc:
            answer = Answer.error(503, "storage_unavailable", f"cannot store messages: {exc}",
                                  **{"Retry-After": STORAGE_RETRY_AFTER})
        self.metrics.answered(route.path, answer.status)
        self.metrics.ingest_seconds.observe(time.perf_counter() - started)
        return answer

    async def accept(self, route: Route, raw: bytes, encoding: str, authorization: str | None,
                     remote: str | None) -> None:
        """Checks and stores one request's messages; raises PayloadError to refuse it."""
        if route.metrics:
            return
        raw = segment.decompress(raw, encoding, segment.MAX_REQUEST_BYTES)
        payload = segment.decode(raw)
        items, top = segment.envelope(payload, route)
        key = segment.write_key(authorization, top)
        if self.write_keys and key not in self.write_keys:
            raise PayloadError(401, "invalid_write_key", "the write key is not accepted here")
        try:
            watch = Watch(self.tap, route.path, key, self.pipeline) \
                if self.tap.watching else None
            entries, counts, tally = await self.process(items, top, route, remote,
                                                        size=len(raw), key=key, watch=watch)
        except RecursionError:
            raise PayloadError(400, "too_deeply_nested", "the payload nests too deeply") from None
        invalid = {k: n for k, n in counts.items() if k.startswith("invalid.")}
        if invalid:
            log.info("ingest: from key %s, not forwarded as the vendor would drop them: %s",
                     mask(key), ", ".join(f"{k[8:]}={n}" for k, n in sorted(invalid.items())))
        try:
            await self.outbox.put(key, entries, counts, self.state.drain())
        except StorageError:
            self.state.forget()
            raise
        self.state.committed()
        if watch is not None:
            watch.publish()
        if "dropped.outbox_full" in counts:
            tally[("dropped", "storage", "outbox_full")] = counts["dropped.outbox_full"]
        self.metrics.record(tally)  # only now: a request refused with 503 comes again

    async def process(
        self, items: list[Any], top: dict[str, Any], route: Route, remote: str | None, *,
        size: int, key: str = "", watch: Watch | None = None,
    ) -> tuple[list[Entry], dict[str, int], Tally]:
        """Each item validated, stamped and measured, then run through the rules; what is left,
        serialised, with the durable counters and the metrics' tally of what happened. `size`
        is the request's (decompressed) size, which bounds what it may store (`segment.Budget`).
        With a shared store, what its rules cannot run on yet is held (`relay.ingest.held`).
        While the tap is watched, `watch` records what it samples.
        """
        seen = Seen()
        budget = segment.Budget(size)
        ready = _assembled(items, top, route, remote, budget=budget, seen=seen, watch=watch)
        refs = held.request_refs(ready)  # once: for the shared store's fetch and the rules' load
        if self.shared is not None:
            ready = await held.fetched(self.shared, ready, refs, key=key, route=route.path,
                                       metrics=self.metrics)
        budget.used = 0
        entries = await self.rules(ready, route.path, budget, seen, refs, watch=watch)
        counts, tally = seen.totals()
        return entries, counts, tally

    async def rules(self, ready: list[tuple[Message, str | None]], route: str,
                    budget: segment.Budget, seen: Seen,
                    refs: list[str] | None = None, *,
                    watch: Watch | None = None) -> list[Entry]:
        """`ready`'s messages through the rules, serialised as stored; what `seen` counts.
        Their users' state (`refs`, when already known) is loaded first, in one go; the rules
        then run without a pause."""
        state = self.state
        try:
            try:
                if self.pipeline.reads_state:
                    await state.load(held.request_refs(ready) if refs is None else refs)
            except sqlite3.Error as exc:  # the file cannot be read: as when it cannot be written
                raise StorageError(f"cannot read user state: {exc}") from exc
            return self._ruled(ready, RuleContext(state=state, route=route), budget, seen, watch)
        finally:
            state.settle()

    def _ruled(self, ready: list[tuple[Message, str | None]], ctx: RuleContext,
               budget: segment.Budget, seen: Seen, watch: Watch | None) -> list[Entry]:
        pipeline = self.pipeline
        entries: list[Entry] = []
        for message, sent in ready:
            if watch is not None and watch.tap.sample(message):
                final = watch.traced(message, pipeline.start(message, ctx, trace=True))
            else:
                final = pipeline.start(message, ctx)
            if not isinstance(final, dict):  # a rule changed, dropped or failed on it
                outcome = final
                for step in outcome.changed_by:
                    _add(seen.changed, step)
                if outcome.message is None:
                    _add(seen.dropped, (str(outcome.dropped_by), str(outcome.reason)))
                    continue
                final = outcome.message
            body = sent if final is message and sent is not None else segment.dumps(final)
            size = len(body)
            if size > segment.MAX_MESSAGE_BYTES or budget.used + size > budget.limit:
                # Only the rules can make a message too large here: it was measured before.
                _add(seen.invalid, budget.over(size) + "_after_rules")
                if watch is not None:
                    watch.too_large(message, budget.over(size) + "_after_rules")
                continue
            budget.used += size
            user_key = segment.user_key(final)
            entries.append((user_key, body))
            if watch is not None and watch.last is message:
                watch.stored(message, user_key)
        return entries


def _assembled(items: list[Any], top: dict[str, Any], route: Route, remote: str | None, *,
               budget: segment.Budget, seen: Seen,
               watch: Watch | None = None) -> list[tuple[Message, str | None]]:
    """Every valid item as the message the client's request makes of it (the batch's shared
    fields merged in, stamped), with its body as stored when its size must be checked; a
    PayloadError 413 when one is over the limits, before any rule or state has seen any."""
    receipt = Receipt(clock.now(), top.get("sentAt"))
    shared = segment.shared_of(top, route)
    if shared:
        budget.check_shared(shared, len(items))
    measure = budget.measured or bool(shared)
    ready: list[tuple[Message, str | None]] = []
    types = seen.types
    for index, item in enumerate(items):
        message = segment.message_from(item, shared, route)
        reason = segment.invalid_reason(message)
        if reason is not None:
            _add(seen.invalid, reason)
            if watch is not None and watch.tap.sample(message):
                watch.invalid(message, reason)
            continue
        kind = message["type"]
        types[kind] = types.get(kind, 0) + 1
        receipt.stamp(message, item, remote if segment.wants_ip(message, route) else None)
        body = None
        if measure:
            body = segment.dumps(message)
            budget.admit(body, index)
        ready.append((message, body))
    return ready


class Seen:
    """What one request's messages came to, tallied by kind once per request, not per message
    (plain dictionaries, here and in what it returns: a single event's request makes one of
    these, and Counters cost more to make than to fill)."""

    __slots__ = ("changed", "dropped", "invalid", "types")

    def __init__(self) -> None:
        self.invalid: dict[str, int] = {}
        self.types: dict[str, int] = {}
        self.changed: dict[str, int] = {}
        self.dropped: dict[tuple[str, str], int] = {}

    def totals(self) -> tuple[dict[str, int], Tally]:
        """The durable counters and the metrics' tally, keyed as they always were."""
        counts: dict[str, int] = {}
        tally: dict[tuple[str, str, str], int] = {}
        for reason, n in self.invalid.items():
            counts[f"invalid.{reason}"] = n
            tally[("dropped", "protocol", reason)] = n
        for kind, n in self.types.items():
            tally[("received", kind, "")] = n
        for step, n in self.changed.items():
            counts[f"changed.{step}"] = n
            tally[("changed", step, "")] = n
        for (step, reason), n in self.dropped.items():
            counts[f"dropped.{step}"] = counts.get(f"dropped.{step}", 0) + n
            tally[("dropped", step, reason)] = n
        return counts, tally


def _add(counts: dict[Any, int], key: Any) -> None:
    counts[key] = counts.get(key, 0) + 1

