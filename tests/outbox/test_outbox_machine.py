"""The durable outbox against a model, step by step (a hypothesis state machine).

Requests are stored by group commit, a few at once; batches are read, then delivered, failed,
bisected down to the message the vendor refuses, or dead-lettered whole, as
`relay.delivery.forwarder` does it (deletes left to commit while the next batch is read ahead,
when `Outbox.may_read_on` allows); relay dies in the middle
and opens the file again, or loses its writer process and goes on. Every step runs on the real
Outbox, its real writer process and a real SQLite file.

After each step the file holds what the model says: each upstream's waiting messages in the
order stored, the dead letters, the counters. A commit that a death cut short is all or
nothing, and which one it was is read from the file. At the end, once everything is drained,
every stored message was delivered or dead-lettered exactly once (twice only when a death came
between its delivery and the commit of its ack), each user's in the order stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from relay.delivery.forwarder import ACKS_IN_FLIGHT
from relay.outbox.group_commit import StorageError
from relay.outbox.store import Outbox, Pending

T = TypeVar("T")

# seg has a write key of its own, so one batch takes every key's messages; june has none and
# forwards each message under its SDK's key, so a batch holds one key's (`Forwarder._read`).
BY_KEY = {"seg": False, "june": True}
UPSTREAMS = tuple(BY_KEY)
KEYS = ("k1", "k2")
USERS = ("u0", "u1", "u2")
COUNTER = "received"
REFUSAL = '{"code":"invalid","message":"bad message"}'
DRAIN_MESSAGES = 50
DRAIN_BYTES = 1 << 20
STEP_SECONDS = 5.0

ENTRIES = st.lists(st.tuples(st.sampled_from(USERS), st.integers(0, 120)), min_size=1, max_size=5)
REQUEST = st.tuples(st.sampled_from(KEYS), ENTRIES)
# The vendor's answer to a batch: taken, failed (kept, tried again), 400 (bisected down to the
# one message it refuses, which is dead-lettered) or 422 (the whole batch dead-lettered).
ANSWERS = st.sampled_from((200, 503, 400, 422))


@dataclasses.dataclass(frozen=True)
class Msg:
    """One message as the model knows it; `seq` is the order it was stored in."""

    seq: int
    key: str
    user: str
    body: str

    @property
    def mid(self) -> str:
        return f"m{self.seq}"


@dataclasses.dataclass
class Put:
    """A request whose put failed: stored whole or not at all, as the file will tell."""

    msgs: list[Msg]


@dataclasses.dataclass
class Ack:
    """The delete of a delivered batch, committing while the forwarder goes on."""

    upstream: str
    msgs: list[Msg]
    task: asyncio.Task[None]


class Overdue(Exception):
    """A step that did not return in STEP_SECONDS."""


def _overdue(signum: int, frame: FrameType | None) -> None:
    raise Overdue(f"still running after {STEP_SECONDS:.0f} s")


@contextlib.contextmanager
def deadline() -> Iterator[None]:
    """Raises Overdue in whatever still runs after STEP_SECONDS, and again every second in
    case the code it lands in swallows exceptions: a coroutine spinning without ever yielding
    is beyond any asyncio timeout, and would hang the suite."""
    previous = signal.signal(signal.SIGALRM, _overdue)
    signal.setitimer(signal.ITIMER_REAL, STEP_SECONDS, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def order_key(upstream: str, msg: Msg) -> tuple[str, str]:
    """Whose order `msg` keeps at `upstream`: its user's, and where the upstream sends each
    message under its own write key, that user's within that key's project at the vendor."""
    return (msg.key if BY_KEY[upstream] else "", msg.user)


def message_id(pending: Pending) -> str:
    return str(json.loads(pending.body)["messageId"])


def writer_pid(outbox: Outbox) -> int:
    proc = outbox._writer._proc
    assert proc is not None, "no writer process"
    return proc.pid


def kill(pid: int) -> None:
    """SIGKILL, returning once the process is dead: whatever it was committing has then
    either reached the file or never will."""
    os.kill(pid, signal.SIGKILL)
    until = time.monotonic() + 10
    while not _dead(pid):
        assert time.monotonic() < until, f"process {pid} outlived SIGKILL by 10 s"
        time.sleep(0.001)


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone: already reaped by asyncio's child watcher
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def read_file(path: str) -> tuple[list[Any], list[Any], int]:
    """The outbox rows, the dead letters (both in id order) and the counter, as one snapshot."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN")  # the writer process may commit between two of these reads
        queued = conn.execute(
            "SELECT upstream, write_key, user_key, body FROM outbox ORDER BY id").fetchall()
        dead = conn.execute("SELECT upstream, write_key, user_key, body, status, answer"
                            " FROM dead_letters ORDER BY id").fetchall()
        (counted,) = conn.execute("SELECT coalesce(sum(count), 0) FROM counters WHERE name = ?",
                                  (COUNTER,)).fetchone()
        conn.execute("COMMIT")
    return queued, dead, int(counted)


class OutboxMachine(RuleBasedStateMachine):
    """Whatever requests, vendor answers and deaths come, in whatever order, the outbox holds
    what was stored and not yet settled, and hands each message out, in its user's order,
    until it is acked or dead-lettered."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory(prefix="relay-outbox-machine-")
        self.path = os.path.join(self.folder.name, "relay.db")
        self.loop = asyncio.new_event_loop()
        self.seqs = itertools.count()
        self.stored: list[Msg] = []  # every message committed, in the order stored
        self.received = 0
        self.waiting: dict[str, list[Msg]] = {u: [] for u in UPSTREAMS}
        self.dead: list[tuple[str, str, str, str, int, str]] = []  # as dead_letters holds them
        self.handed: dict[str, list[Msg]] = {u: [] for u in UPSTREAMS}  # delivered or dead
        self.again: dict[str, set[str]] = {u: set() for u in UPSTREAMS}  # may come twice
        self.acking: dict[str, list[Ack]] = {u: [] for u in UPSTREAMS}
        self.ahead: dict[str, tuple[int, int] | None] = dict.fromkeys(UPSTREAMS)  # (id, seq)
        self.unsure: list[Put | Ack] = []  # failed with the writer: committed, or not at all
        try:
            self.outbox = self.run(self._open())
        except BaseException:
            self.loop.close()
            self.folder.cleanup()
            raise

    def run(self, step: Coroutine[Any, Any, T]) -> T:
        with deadline():
            return self.loop.run_until_complete(step)

    async def _open(self) -> Outbox:
        # NORMAL: what is emulated is relay's process dying, which a WAL file at NORMAL
        # survives whole; only a power cut needs FULL.
        outbox = Outbox(self.path, UPSTREAMS, "normal")
        await outbox.open()
        return outbox

    # ------------------------------------------------------------ rules

    @rule(requests=st.lists(REQUEST, min_size=1, max_size=3))
    def store(self, requests: list[tuple[str, list[tuple[str, int]]]]) -> None:
        """Requests stored at once share group commits; each is durable when put returns, and
        they are queued in the order they were sent."""
        self._begin()
        batches = [self._new(key, entries) for key, entries in requests]
        self.run(self._store_all(batches))
        for msgs in batches:
            self._keep(msgs)

    async def _store_all(self, batches: list[list[Msg]]) -> None:
        await asyncio.gather(*(self._put(msgs) for msgs in batches))

    @rule(upstream=st.sampled_from(UPSTREAMS), max_messages=st.integers(1, 4),
          max_bytes=st.integers(60, 600), answers=st.lists(ANSWERS, min_size=1, max_size=4),
          refused=st.integers(0, 3))
    def forward(self, upstream: str, max_messages: int, max_bytes: int, answers: list[int],
                refused: int) -> None:
        """Turns of the forwarder's loop, one per answer: each batch (read ahead after a full
        one, else from the start once the last deletes committed) is what the model says, and
        the vendor's answer settles it or leaves it to come again."""
        self._begin()
        self.run(self._forward(upstream, max_messages, max_bytes, answers, refused))

    async def _forward(self, upstream: str, max_messages: int, max_bytes: int,
                       answers: list[int], refused: int) -> None:
        for answer in answers:
            ahead, self.ahead[upstream] = self.ahead[upstream], None
            if ahead is None:
                # A read from the start must not see what was delivered: the forwarder waits
                # for the deletes still committing first.
                await self._acked(upstream)
            after, after_seq = ahead or (0, -1)
            batch = await self.outbox.next_batch(upstream, max_messages, max_bytes,
                                                 by_key=BY_KEY[upstream], after=after)
            msgs = self._expected(upstream, max_messages, max_bytes, after_seq)
            self._same(batch, msgs, after)
            if not batch:
                return
            if answer == 503:
                continue
            if answer == 200:
                await self._deliver(upstream, batch, msgs)
            elif answer == 400:
                await self._bisect(upstream, batch, msgs, msgs[refused % len(msgs)])
            else:
                await self._dead_letter(upstream, batch, msgs, answer)
            if len(batch) == max_messages and await self.outbox.may_read_on(
                    upstream, batch, by_key=BY_KEY[upstream]):
                self.ahead[upstream] = (batch[-1].id, msgs[-1].seq)

    @rule(whole=st.booleans(), request=REQUEST, delay=st.sampled_from((0.0, 0.001, 0.005)))
    def dies(self, whole: bool, request: tuple[str, list[tuple[str, int]]],
             delay: float) -> None:
        """relay dies while a request is being stored and deletes are committing, and starts
        again on the same file; or only its writer process dies, and relay goes on with a new
        one by the request's next try. Either way what was committed stays, what was cut short
        is there whole or not at all, and what lost its delete comes again."""
        self._begin()
        if whole:
            self.run(self._die(request, delay))
            self.ahead = dict.fromkeys(UPSTREAMS)
        else:
            old = writer_pid(self.outbox)
            kill(old)
            self.run(self._store_through_death(*request))
            assert writer_pid(self.outbox) != old

    async def _die(self, request: tuple[str, list[tuple[str, int]]], delay: float) -> None:
        outbox = self.outbox
        assert outbox.writable
        msgs = self._new(*request)
        storing = asyncio.get_running_loop().create_task(self._put(msgs))
        await asyncio.sleep(delay)  # 0: killed before the request is even sent
        # The closest to relay's own SIGKILL in-process: its writer process, the one
        # connection that writes, killed with the event loop held still (kill blocks), so
        # that nothing of relay's runs between the decision and the death.
        kill(writer_pid(outbox))
        # Closing now commits nothing more: the writer is dead and a closing outbox starts no
        # new one; it only fails what it still held and lets go of its reading connection.
        await outbox.close()
        for upstream in UPSTREAMS:
            await self._acked(upstream)
        await asyncio.wait([storing])
        if storing.exception() is None:
            self._keep(msgs)
        elif isinstance(storing.exception(), StorageError):
            self.unsure.append(Put(msgs))
        else:
            storing.result()
        self.outbox = await self._open()

    async def _store_through_death(self, key: str, entries: list[tuple[str, int]]) -> None:
        for _ in range(3):
            # Each try with messageIds of its own: should a failed one have been stored after
            # all, the model holds both copies apart.
            msgs = self._new(key, entries)
            try:
                await self._put(msgs)
            except StorageError:
                self.unsure.append(Put(msgs))
                continue
            self._keep(msgs)
            break
        else:
            pytest.fail("three tries after the writer died, none was stored")
        for upstream in UPSTREAMS:
            unsure = len(self.unsure)
            await self._acked(upstream)
            if len(self.unsure) > unsure:
                # The forwarder meets the failed delete and reads again from the start.
                self.ahead[upstream] = None

    # ------------------------------------------------------------ invariants

    @invariant()
    def file_matches_the_model(self) -> None:
        """After every step the file holds exactly the model's waiting messages, dead letters
        and counter, backlog counts the waiting messages, and commits succeed."""
        self._reap()
        self._check_file()
        self.run(self._check_backlogs())
        assert self.outbox.writable

    def teardown(self) -> None:
        """Drains every upstream, then checks that each stored message was handed out exactly
        once (twice only after a lost delete) and each user's in the order stored."""
        try:
            # After a failed step its error is the report: a drain on a model that step left
            # behind would only bury it under a second one.
            if sys.exc_info()[0] is None:
                self.run(self._drain())
                self._check_end()
        finally:
            try:
                self.run(self._shut())
            finally:
                self.loop.close()
                self.folder.cleanup()

    async def _shut(self) -> None:
        await self.outbox.close()  # ends the writer process
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if leftover:  # only after a failed step: let them end, or stop them
            _, stuck = await asyncio.wait(leftover, timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)

    async def _drain(self) -> None:
        for upstream in UPSTREAMS:
            await self._acked(upstream)
        self._check_file()
        for upstream in UPSTREAMS:
            while batch := await self.outbox.next_batch(
                    upstream, DRAIN_MESSAGES, DRAIN_BYTES, by_key=BY_KEY[upstream]):
                msgs = self._expected(upstream, DRAIN_MESSAGES, DRAIN_BYTES, -1)
                self._same(batch, msgs, 0)
                await self._deliver(upstream, batch, msgs)
                await self._acked(upstream)

    def _check_end(self) -> None:
        self._check_file()
        self.run(self._check_backlogs())
        by_id = {m.mid: m for m in self.stored}
        for upstream in UPSTREAMS:
            assert not self.waiting[upstream]
            handed = [m.mid for m in self.handed[upstream]]
            assert set(handed) == set(by_id), (
                f"{upstream}: never handed out {sorted(set(by_id) - set(handed))}, handed out"
                f" but never stored {sorted(set(handed) - set(by_id))}")
            twice = {mid for mid, n in Counter(handed).items() if n > 1}
            assert twice <= self.again[upstream], (
                f"{upstream}: handed out twice with their deletes committed:"
                f" {sorted(twice - self.again[upstream])}")
            # As the vendor sees them: it drops a messageId it has already taken.
            first = [by_id[mid] for mid in dict.fromkeys(handed)]
            for whose in {order_key(upstream, m) for m in self.stored}:
                went = [m.mid for m in first if order_key(upstream, m) == whose]
                came = [m.mid for m in self.stored if order_key(upstream, m) == whose]
                assert went == came, f"{upstream} {whose}: handed out {went}, stored {came}"

    # ------------------------------------------------------------ the forwarder's moves

    async def _deliver(self, upstream: str, batch: list[Pending], msgs: list[Msg]) -> None:
        self._hand_out(upstream, msgs)
        acking = self.acking[upstream]
        if len(acking) >= ACKS_IN_FLIGHT:
            await self._settled(acking.pop(0))
        task = asyncio.get_running_loop().create_task(self.outbox.ack(batch))
        acking.append(Ack(upstream, msgs, task))

    async def _bisect(self, upstream: str, batch: list[Pending], msgs: list[Msg],
                      refused: Msg) -> None:
        if refused not in msgs:
            await self._deliver(upstream, batch, msgs)
        elif len(msgs) == 1:
            await self._dead_letter(upstream, batch, msgs, 400)
        else:
            middle = len(msgs) // 2
            await self._bisect(upstream, batch[:middle], msgs[:middle], refused)
            await self._bisect(upstream, batch[middle:], msgs[middle:], refused)

    async def _dead_letter(self, upstream: str, batch: list[Pending], msgs: list[Msg],
                           status: int) -> None:
        self._hand_out(upstream, msgs)
        await self.outbox.dead_letter(upstream, batch, status, REFUSAL)
        self._remove(upstream, msgs)
        self.dead.extend((upstream, m.key, m.user, m.body, status, REFUSAL) for m in msgs)

    async def _acked(self, upstream: str) -> None:
        while self.acking[upstream]:
            await self._settled(self.acking[upstream].pop(0))

    async def _settled(self, ack: Ack) -> None:
        await asyncio.wait([ack.task])
        self._settle(ack)

    # ------------------------------------------------------------ the model

    def _new(self, key: str, entries: list[tuple[str, int]]) -> list[Msg]:
        msgs = []
        for user, pad in entries:
            seq = next(self.seqs)
            body = json.dumps({"type": "track", "userId": user, "event": "Clicked",
                               "messageId": f"m{seq}", "properties": {"pad": "x" * pad}},
                              separators=(",", ":"))
            msgs.append(Msg(seq, key, user, body))
        return msgs

    async def _put(self, msgs: list[Msg]) -> None:
        await self.outbox.put(msgs[0].key, [(m.user, m.body) for m in msgs],
                              {COUNTER: len(msgs)})

    def _keep(self, msgs: list[Msg]) -> None:
        """`msgs` committed; a put settled late (found in the file) still goes in its place."""
        self.stored = sorted([*self.stored, *msgs], key=lambda m: m.seq)
        for upstream in UPSTREAMS:
            self.waiting[upstream] = sorted([*self.waiting[upstream], *msgs],
                                            key=lambda m: m.seq)
        self.received += len(msgs)

    def _remove(self, upstream: str, msgs: list[Msg]) -> None:
        gone = {m.mid for m in msgs}
        self.waiting[upstream] = [m for m in self.waiting[upstream] if m.mid not in gone]

    def _expected(self, upstream: str, max_messages: int, max_bytes: int,
                  after_seq: int) -> list[Msg]:
        """What next_batch promises: the oldest waiting messages stored after `after_seq`
        (with the oldest one's write key, by key), up to max_messages, and up to max_bytes
        counting a byte more for each, though always at least one."""
        candidates = [m for m in self.waiting[upstream] if m.seq > after_seq]
        if BY_KEY[upstream] and candidates:
            candidates = [m for m in candidates if m.key == candidates[0].key]
        batch: list[Msg] = []
        size = 0
        for msg in candidates[:max_messages]:
            size += len(msg.body) + 1
            if batch and size > max_bytes:
                break
            batch.append(msg)
        return batch

    @staticmethod
    def _same(batch: list[Pending], msgs: list[Msg], after: int) -> None:
        read = [message_id(p) for p in batch]
        assert read == [m.mid for m in msgs], f"read {read}, the model says {[m.mid for m in msgs]}"
        assert [(p.write_key, p.user_key, p.body) for p in batch] == [
            (m.key, m.user, m.body) for m in msgs]
        ids = [p.id for p in batch]
        assert ids == sorted(set(ids)) and all(i > after for i in ids), ids

    def _hand_out(self, upstream: str, msgs: list[Msg]) -> None:
        """`msgs` delivered or dead-lettered, in this order: none may come before a message of
        its user stored earlier and still waiting, nor come twice but after a lost delete."""
        done = {m.mid for m in self.handed[upstream]}
        for msg in msgs:
            assert msg.mid not in done or msg.mid in self.again[upstream], (
                f"{upstream}: {msg.mid} handed out again though its delete was committed")
            whose = order_key(upstream, msg)
            skipped = [m.mid for m in self.stored if m.seq < msg.seq and m.mid not in done
                       and order_key(upstream, m) == whose]
            assert not skipped, (
                f"{upstream}: {msg.mid} of {whose} handed out before {skipped}, stored earlier")
            self.handed[upstream].append(msg)
            done.add(msg.mid)

    def _begin(self) -> None:
        self._reap()
        if self.unsure:
            self._check_file()

    def _reap(self) -> None:
        for upstream, acking in self.acking.items():
            self.acking[upstream] = [ack for ack in acking if not ack.task.done()]
            for ack in acking:
                if ack.task.done():
                    self._settle(ack)

    def _settle(self, ack: Ack) -> None:
        error = ack.task.exception()
        if error is None:
            self._remove(ack.upstream, ack.msgs)
        elif isinstance(error, StorageError):
            self.unsure.append(ack)
        else:
            raise error

    def _check_file(self) -> None:
        """The file against the model, settling first from it what failed with the writer."""
        queued, dead, counted = read_file(self.path)
        present = {(row[0], json.loads(row[3])["messageId"]) for row in queued}
        for op in self.unsure:
            if isinstance(op, Put):
                if (UPSTREAMS[0], op.msgs[0].mid) in present:
                    self._keep(op.msgs)
            elif (op.upstream, op.msgs[0].mid) in present:
                self.again[op.upstream].update(m.mid for m in op.msgs)
            else:
                self._remove(op.upstream, op.msgs)
        self.unsure = []
        # Deletes still committing may be in the file or not yet, each one whole.
        deleted = {(ack.upstream, m.mid) for acks in self.acking.values() for ack in acks
                   if (ack.upstream, ack.msgs[0].mid) not in present for m in ack.msgs}
        for upstream in UPSTREAMS:
            rows = [tuple(row) for row in queued if row[0] == upstream]
            model = [(upstream, m.key, m.user, m.body) for m in self.waiting[upstream]
                     if (upstream, m.mid) not in deleted]
            assert rows == model, (
                f"{upstream}: the file holds {[json.loads(r[3])['messageId'] for r in rows]},"
                f" the model {[json.loads(r[3])['messageId'] for r in model]}")
        assert [tuple(row) for row in dead] == self.dead
        assert counted == self.received

    async def _check_backlogs(self) -> None:
        for upstream in UPSTREAMS:
            deletes = [len(ack.msgs) for ack in self.acking[upstream]]
            backlog = await self.outbox.backlog(upstream)
            # Deletes commit in the order sent, and may while it counts.
            possible = {len(self.waiting[upstream]) - sum(deletes[:n])
                        for n in range(len(deletes) + 1)}
            assert backlog in possible, f"{upstream}: backlog {backlog}, the model {possible}"


def test_outbox_hands_out_every_stored_message_once_in_order() -> None:
    """Through any mix of stores, reads, vendor answers and deaths, the file always matches the
    model, and every stored message is delivered or dead-lettered exactly once (twice only
    after a lost delete), each user's in the order stored."""
    run_state_machine_as_test(OutboxMachine, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


def test_a_batch_read_ahead_by_key_keeps_each_users_order() -> None:
    """june sends each batch under one write key. With k1's and k2's messages of one user
    interleaved, a full batch of k1's passes over k2's oldest; no batch is then read ahead
    after it, so k2's next message is not handed out before that oldest one."""
    machine = OutboxMachine()
    try:
        machine.store([("k1", [("u0", 0)]), ("k2", [("u0", 0)]), ("k1", [("u0", 0)]),
                       ("k2", [("u0", 0)])])
        machine.file_matches_the_model()
        machine.forward("june", max_messages=2, max_bytes=600, answers=[200, 200], refused=0)
        machine.file_matches_the_model()
    finally:
        machine.teardown()


async def test_close_returns_when_the_commit_in_flight_was_just_answered(
    tmp_path: Path,
) -> None:
    """Outbox.close, called after the writer answered the commit in flight but before that
    answer is settled (a turn of the event loop later), returns, and the commit stands."""
    outbox = Outbox(str(tmp_path / "relay.db"), ["seg"], "normal")
    await outbox.open()
    body = '{"messageId":"m0"}'
    storing = asyncio.create_task(outbox.put("k1", [("u0", body)], {COUNTER: 1}))
    group = outbox._group
    try:
        # One turn at a time: the answer is settled by a callback one turn after it is read,
        # so some turn sees it answered and not yet settled (an event would wake us too late).
        while group._in_flight is None or not group._in_flight.done():  # noqa: ASYNC110
            await asyncio.sleep(0)
        with deadline():
            await outbox.close()
        await storing
    finally:
        await outbox.close()  # after an overdue first one: ends the writer process it left
        await asyncio.wait([storing])
    queued, _, counted = read_file(outbox.path)
    assert [row[3] for row in queued] == [body]
    assert counted == 1
