"""The user-state contract, on both backends: every case of `one_group_per_user` and
`drop_internal_users` in tests/rules/test_rules.py, played against one relay's SQLite state, and
against two relays sharing one real Redis, the messages taking turns between them. The answers
must be the same: what one relay learned, the other knows once it is shipped.

A step on the shared backend is what a request does there: the users' state fetched from Redis
(the cache's lifetime is 0 here, so every fetch asks), the rules, the writes committed to that
relay's SQLite file with the journal, and the journal shipped to Redis."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redisproc import RedisServer
from test_rules import (
    B2B,
    DETECTION_CASES,
    INTERNAL,
    ONE_GROUP_CASES,
    OWN_GROUP_CASES,
    Expected,
    Message,
    check,
    group_call,
    grouped,
    identify,
    load,
    run,
    track,
)

from relay.config.model import UserState
from relay.ingest import held
from relay.metrics import Metrics
from relay.state.model import storable
from relay.state.redis_store import RedisStore
from relay.state.shared import SharedState
from relay.state.shipper import Shipper
from relay.state.sqlite import SqliteState

Step = Callable[[int, Message], Awaitable[Any]]


def committed(db: Path) -> Callable[[list[tuple[str, list[tuple[Any, ...]]]]], Awaitable[None]]:
    """What the outbox's group commit does with statements: one committed transaction."""

    async def commit(statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        with sqlite3.connect(db) as conn:
            for sql, rows in statements:
                conn.executemany(sql, rows)
        conn.close()

    return commit


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[
        Callable[[str], Step]]:
    """For the rules of a case, how to take message i: on one SQLite state, or on relay i % 2
    of two sharing Redis."""
    if request.param == "sqlite":
        alone = SqliteState(str(tmp_path / "one.db"))
        await alone.open()
        commit = committed(tmp_path / "one.db")

        def one(rules: str) -> Step:
            async def step(_: int, message: Message) -> Any:
                outcome = await run(load(rules), alone, message)
                await commit(alone.drain())
                return outcome
            return step

        yield one
        await alone.close()
        return
    if not RedisServer.available():
        pytest.skip("needs Debian's redis-server")
    server = RedisServer(tmp_path / "redis").start()
    relays: list[tuple[SharedState, Shipper, Callable[..., Awaitable[None]]]] = []
    for n in range(2):
        db = tmp_path / f"relay-{n}.db"
        # A slow moment of a busy machine is no contract breach: the timeout is not what is tested.
        store = RedisStore(UserState(backend="redis", url=server.url, cache_ms=0, timeout_ms=5000),
                           Metrics())
        state = SharedState(str(db), store, cache_ms=0)
        await state.open()
        relays.append((state, Shipper(state, store, committed(db)), committed(db)))

    def two(rules: str) -> Step:
        async def step(i: int, message: Message) -> Any:
            state, shipper, commit = relays[i % 2]
            assert await state.prefetch(held.request_refs([(message, None)]))
            outcome = await run(load(rules), state, message)
            await commit(state.drain())
            await shipper.ship_all()
            return outcome
        return step

    yield two
    for state, _, _ in relays:
        await state.close()
        await state.store.close()
    server.stop()


@pytest.mark.parametrize(("rules", "steps"), ONE_GROUP_CASES + DETECTION_CASES + OWN_GROUP_CASES)
async def test_the_state_contract(rules: str, steps: list[tuple[Message, Expected]],
                                  backend: Callable[[str], Step]) -> None:
    """Each (message, expected) of the case, in order, gives the same answer on either
    backend: one relay, or two taking turns on one Redis."""
    step = backend(rules)
    for i, (message, expected) in enumerate(steps):
        outcome = await step(i, message)
        try:
            check(outcome, message, expected)
        except AssertionError as exc:
            raise AssertionError(f"step {i}: {message} -> {outcome}") from exc


ODD_IDS = ["u\ud800x", 'q"uote\\', "new\nline", "日本-ü", " ", "0", "a:u:colon"]


@pytest.mark.parametrize("odd", ODD_IDS)
async def test_any_id_the_protocol_allows(odd: str, backend: Callable[[str], Step]) -> None:
    """Ids with a lone surrogate, quotes, a newline, non-ASCII or ref-like text are kept apart
    and found again on either backend: a staff member identified on one relay is dropped on
    the other, a user's group is injected there, and such a group id is kept too."""
    step = backend(B2B)
    check(await step(0, identify("bob@acme.io", userId=odd)), {}, INTERNAL)
    check(await step(1, track(userId=odd)), {}, INTERNAL)
    other = track(userId=odd + "2")
    check(await step(2, other), other, other)
    call = group_call("G1", 9, anonymousId=odd)
    check(await step(3, call), call, call)
    anon = track(anonymousId=odd)
    check(await step(4, anon), anon, grouped(anon, "G1"))
    named = group_call(odd, 9, userId="u1")
    check(await step(5, named), named, named)
    mine = track(userId="u1")  # a lone surrogate is injected as its escape, as it is stored
    check(await step(6, mine), mine, grouped(mine, storable(odd)))
