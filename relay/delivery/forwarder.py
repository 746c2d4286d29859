"""Drains one upstream's outbox: batches, backoff, Retry-After, bisecting, dead letters, pauses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import orjson

from relay import clock
from relay.delivery import vendor_batch
from relay.delivery.health import Answer, Health, one_line, retry_after, retryable
from relay.metrics import Metrics
from relay.outbox.group_commit import StorageError
from relay.outbox.store import Outbox, Pending
from relay.tap import records
from relay.tap.hub import Tap, shown_key

if TYPE_CHECKING:  # the config is read by every stage; it imports the stages itself
    from relay.config.model import Upstream

log = logging.getLogger("relay.forwarder")

LINGER_SECONDS = 0.05
ANSWER_SNIPPET = 500
# Deletes of delivered batches left to commit while the next batch is sent. With one, each batch
# waited for the last one's delete (and now and then a WAL checkpoint) before its own could start:
# two let the forwarder go on meanwhile, and a crash sends at most three batches again.
ACKS_IN_FLIGHT = 2
# While a long backoff after the vendor could not be reached runs out, whether it can be again
# is asked this often, with a TCP connect and nothing sent: it resumes within seconds of the
# vendor's return instead of up to backoff_max_seconds later, and asks little while it is down.
PROBE_SECONDS = 2.0


class Forwarder:
    """Sends one upstream everything its queue holds, in order, for as long as relay runs."""

    def __init__(self, upstream: Upstream, outbox: Outbox, session: aiohttp.ClientSession,
                 metrics: Metrics, tap: Tap | None = None) -> None:
        self.upstream = upstream
        self.tap = tap or Tap()
        self.outbox = outbox
        self.session = session
        self.metrics = metrics
        self.url = vendor_batch.batch_url(upstream.kind, upstream.url)
        self.health = Health(upstream, self.url, metrics)
        self._deadline: float | None = None
        self._stop = asyncio.Event()
        self._ahead: asyncio.Task[list[Pending]] | None = None  # the next batch, read ahead
        self._acking: list[asyncio.Task[None]] = []  # delivered batches' deletes, oldest first

    @property
    def paused(self) -> bool:
        return self.health.paused

    @property
    def failures(self) -> int:
        return self.health.failures

    def stop(self, grace_seconds: float) -> None:
        """Finish what is queued within `grace_seconds`, then return; the rest stays stored."""
        self._deadline = time.monotonic() + grace_seconds
        self._stop.set()
        self.outbox.signal(self.upstream.name).set()  # wake an idle loop to notice at once

    async def run(self) -> None:
        """The delivery loop; returns after `stop` once the queue is empty or the grace is over."""
        signal = self.outbox.signal(self.upstream.name)
        try:
            await self._deliver_all(signal)
        finally:
            ahead, self._ahead = self._ahead, None
            if ahead is not None:  # stopped while a batch was read ahead: not needed now
                ahead.cancel()
                if ahead.done() and not ahead.cancelled():
                    ahead.exception()  # retrieved, so that asyncio does not log it
            # What was delivered is deleted before relay stops, not sent again on the next start.
            with contextlib.suppress(StorageError, sqlite3.Error):
                await self._acked()

    async def _deliver_all(self, signal: asyncio.Event) -> None:
        while not self._out_of_time():
            signal.clear()
            try:
                if self._ahead is None:
                    await self._acked()  # a read from the start must not see what was sent
                batch = self._fit(await (self._ahead or self._read()))
                self._ahead = None
                if not batch:
                    if self._stop.is_set():
                        return
                    await _wait(signal, 1.0)
                    continue
                if len(batch) == self.upstream.max_batch_messages and \
                        await self.outbox.may_read_on(self.upstream.name, batch,
                                                      by_key=not self.upstream.write_key):
                    # A backlog: the next batch is read while this one is on its way (ids
                    # only grow, so what follows this batch now is what will follow it then).
                    self._ahead = asyncio.create_task(self._read(after=batch[-1].id))
                wait = await self.deliver(batch)
            except (StorageError, sqlite3.Error) as exc:
                # Delivered but not yet deleted is fine: it is sent again, and the vendor
                # deduplicates on messageId. Losing the loop is not.
                wait = self.health.storage_failed(exc)
            if wait is not None:
                if self._ahead is not None:
                    await _discard(self._ahead)  # this batch is read again first
                    self._ahead = None
                await (self._probing(wait) if self.health.unreachable else self._sleep(wait))
            elif len(batch) < self.upstream.max_batch_messages and not self._stop.is_set():
                # Under a steady stream, a short pause fills the next batch instead of sending
                # many small ones; when idle it only delays the next message by as much.
                await _wait(self._stop, LINGER_SECONDS)

    async def _read(self, after: int = 0) -> list[Pending]:
        return await self.outbox.next_batch(
            self.upstream.name, self.upstream.max_batch_messages, self.upstream.max_batch_bytes,
            by_key=not self.upstream.write_key, after=after)

    def _fit(self, batch: list[Pending]) -> list[Pending]:
        """The head of `batch` whose whole request body, envelope included, stays within
        max_batch_bytes (a single message is sent whatever its size: the vendor judges it)."""
        if not batch:
            return batch
        key = self.upstream.write_key or batch[0].write_key
        budget = self.upstream.max_batch_bytes - len(
            vendor_batch.batch_body(self.upstream.kind, [], key, clock.now()))
        size = 0
        for count, pending in enumerate(batch):
            size += len(pending.body) + (1 if count else 0)
            if size > budget:
                return batch[:max(count, 1)]
        return batch

    async def deliver(self, batch: list[Pending]) -> float | None:
        """Sends `batch`; None when it was settled (sent or set aside), else seconds to wait."""
        answer = await self.post(batch)
        self.metrics.deliveries.labels(self.upstream.name, str(answer.status or "error")).inc()
        self.metrics.batch_messages.observe(len(batch))
        if 200 <= answer.status < 300:
            if len(self._acking) >= ACKS_IN_FLIGHT:
                await self._acking.pop(0)
            self._acking.append(asyncio.create_task(self.outbox.ack(batch)))
            self.health.recovered()
            self._shown(batch, "delivered", answer)
            return None
        if answer.status in (400, 413):
            return await self._bisect(batch, answer)
        if retryable(answer.status):
            self._shown(batch, "retrying", answer)
            return self.health.backoff(answer, len(batch))
        # 404 on the batch path is a wrong `url` (a vendor has that path), not a bad message:
        # dead-lettering would set every message aside until someone replays them.
        if answer.status in (401, 403, 404) or 300 <= answer.status < 400:
            self._shown(batch, "paused", answer)
            return self.health.pause(answer)
        await self._dead_letter(batch, answer)
        return None

    def _shown(self, batch: list[Pending], outcome: str, answer: Answer) -> None:
        """What became of `batch`, to the tap's viewers (only while someone watches)."""
        if self.tap.watching:
            ids = [shown_key(pending.user_key, _message_id(pending.body)) for pending in batch]
            detail = None if 200 <= answer.status < 300 else one_line(answer.text)
            self.tap.delivery(self.upstream.name, ids,
                              records.delivery(outcome, answer.status, detail))

    async def post(self, batch: list[Pending]) -> Answer:
        """One batch request; network failures and timeouts are status 0."""
        key = self.upstream.write_key or batch[0].write_key
        body = vendor_batch.batch_body(self.upstream.kind, [p.body for p in batch], key,
                                       clock.now())
        timeout = aiohttp.ClientTimeout(total=self.upstream.timeout_seconds)
        try:
            async with self.session.post(
                self.url, data=body, headers=vendor_batch.batch_headers(key),
                timeout=timeout, allow_redirects=False,
            ) as response:
                text = await response.text(errors="replace")
                wait = retry_after(response.headers.get("Retry-After"))
                return Answer(response.status, text[:ANSWER_SNIPPET], wait)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return Answer(0, f"{type(exc).__name__}: {exc}"[:ANSWER_SNIPPET])

    async def _acked(self) -> None:
        """Waits for the deletes of delivered batches, which commit while the next batches are
        on their way; raises the first failure, once all have ended. Those messages are then
        still stored and are sent again: the vendor deduplicates on messageId."""
        failure: BaseException | None = None
        while self._acking:
            try:
                await self._acking.pop(0)
            except (StorageError, sqlite3.Error) as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _bisect(self, batch: list[Pending], answer: Answer) -> float | None:
        """A refused batch split in halves until the message the upstream rejects stands alone."""
        if len(batch) == 1:
            await self._dead_letter(batch, answer)
            return None
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            wait = await self.deliver(half)
            if wait is not None:
                return wait
        return None

    async def _dead_letter(self, batch: list[Pending], answer: Answer) -> None:
        await self.outbox.dead_letter(self.upstream.name, batch, answer.status, answer.text)
        self._shown(batch, "dead_letter", answer)
        self.metrics.dead_letters.labels(self.upstream.name).inc(len(batch))
        log.error(
            "upstream %s: %d message(s) dead-lettered, answer %d: %s",
            self.upstream.name, len(batch), answer.status, one_line(answer.text),
        )

    async def _probing(self, seconds: float) -> None:
        """`_sleep(seconds)`, cut short once the vendor accepts a connection again. Only a
        wait longer than two probes is probed, and never once relay is stopping (a lookup of
        a host that does not resolve may outlast the grace)."""
        if seconds < 2 * PROBE_SECONDS:
            await self._sleep(seconds)
            return
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0 and not self._stop.is_set():
            await self._sleep(min(left, PROBE_SECONDS))
            if self._stop.is_set() or until - time.monotonic() <= 0:
                return
            if await self._reachable():
                return

    async def _reachable(self) -> bool:
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(parts.hostname, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def _out_of_time(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    async def _sleep(self, seconds: float) -> None:
        if self._deadline is None:
            await _wait(self._stop, seconds)  # a stop wakes it for one last try within the grace
        else:
            await asyncio.sleep(min(seconds, max(self._deadline - time.monotonic(), 0.0)))


async def _discard(task: asyncio.Task[list[Pending]]) -> None:
    """Lets a read ahead finish unused; its failure, if any, is met again on the next read."""
    with contextlib.suppress(StorageError, sqlite3.Error):
        await task


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


_ID = '"messageId":"'


def _message_id(body: str) -> object:
    """A stored message's messageId. Every stored message has one, so where the key occurs once
    it is that one, read without parsing the body (a parse took ~1.4 µs a message, paid by
    every delivered message while someone watched the tap)."""
    start = body.find(_ID) + len(_ID)
    if start >= len(_ID) and body.find(_ID, start) < 0:
        end = body.find('"', start)
        if end > 0 and "\\" not in body[start:end]:
            return body[start:end]
    try:
        return orjson.loads(body).get("messageId")
    except (orjson.JSONDecodeError, AttributeError):  # lone surrogates: shown without delivery
        return None
