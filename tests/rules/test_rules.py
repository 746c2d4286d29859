"""Every rule, table-driven: built from YAML as relay builds it, run through the real Pipeline
over a real SQLite-backed state; each row is input message(s) -> output message or Drop."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import model as config
from relay.pipeline import identity
from relay.pipeline.runner import Drop, Outcome, Pipeline, RuleContext
from relay.state.sqlite import SqliteState

Message = dict[str, Any]
Expected = Message | Drop
UPSTREAM = 'upstreams: [{name: u, kind: segment, url: "http://127.0.0.1:9"}]\n'
HASH_KEY = "a-test-secret-of-32-characters!!"
INTERNAL = Drop("internal_user")

# The B2B rules in the order the shipped config uses, and drop_internal_users on its own.
B2B = ("[{type: one_group_per_user},"
       " {type: drop_internal_users, email_domains: [acme.io], user_ids: [staff-7],"
       " own_groups: [acme-hq]}]")
STAFF = ("[{type: drop_internal_users, email_domains: [acme.io], user_ids: [staff-7],"
         " own_groups: [acme-hq]}]")


def load(rules: str) -> config.Config:
    """The config of `rules` (a YAML list) as relay.config.parse builds it."""
    return config.parse("t.yaml", UPSTREAM + "rules: " + rules + "\n")


def exact(value: Any) -> str:
    """`value` as JSON, so that `1`, `1.0` and `true` (equal in Python) compare different."""
    return json.dumps(value, sort_keys=True)


def at(hour: int) -> str:
    """An event timestamp on one fixed day."""
    return f"2024-05-01T{hour:02d}:00:00.000Z"


def grouped(message: Message, group: str) -> Message:
    """`message` with `context.groupId` set to `group`."""
    return {**message, "context": {**message.get("context", {}), "groupId": group}}


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[SqliteState]:
    """A SqliteState on a real SQLite file, schema created by open()."""
    opened = SqliteState(str(tmp_path / "s.db"))
    await opened.open()
    yield opened
    await opened.close()


async def run(cfg: config.Config, state: SqliteState, message: Message) -> Outcome:
    """`message` through the config's pipeline; the input must come out untouched."""
    before = copy.deepcopy(message)
    outcome = await Pipeline(cfg.rules, cfg.on_rule_error).run(message, RuleContext(state=state))
    assert exact(message) == exact(before), "a rule changed the message it was given"
    return outcome


def check(outcome: Outcome, message: Message, expected: Expected) -> None:
    """The outcome is `expected`; an unchanged message is the very object that went in."""
    if isinstance(expected, Drop):
        assert (outcome.message, outcome.reason) == (None, expected.reason)
        return
    assert outcome.reason is None
    assert outcome.message == expected
    assert exact(outcome.message) == exact(expected)
    if exact(expected) == exact(message):
        assert outcome.message is message
        assert outcome.changed_by == []
    else:
        assert outcome.message is not message
        assert outcome.changed_by != []


async def play(rules: str, state: SqliteState, steps: list[tuple[Message, Expected]]) -> None:
    """Each (message, expected) in order, through one pipeline sharing one state."""
    cfg = load(rules)
    for i, (message, expected) in enumerate(steps):
        outcome = await run(cfg, state, message)
        try:
            check(outcome, message, expected)
        except AssertionError as exc:
            raise AssertionError(f"step {i}: {message} -> {outcome}") from exc


TRACK: Message = {"type": "track", "userId": "u1", "event": "Clicked"}

SET = "[{type: set, path: context.app.name, value: web}]"
SET_CASES = [
    pytest.param(SET, TRACK, {**TRACK, "context": {"app": {"name": "web"}}}, id="creates-parents"),
    pytest.param(SET, {**TRACK, "context": {"app": {"name": "ios", "version": "2"}, "ip": "1"}},
                 {**TRACK, "context": {"app": {"name": "web", "version": "2"}, "ip": "1"}},
                 id="replaces-keeps-siblings"),
    pytest.param(SET, {**TRACK, "context": {"app": {"name": "web"}}},
                 {**TRACK, "context": {"app": {"name": "web"}}}, id="already-set-same-object"),
    pytest.param(SET, {**TRACK, "context": {"app": "x"}},
                 {**TRACK, "context": {"app": {"name": "web"}}}, id="non-object-parent-replaced"),
    pytest.param("[{type: set, path: context.library, value: {name: relay, version: 1}}]", TRACK,
                 {**TRACK, "context": {"library": {"name": "relay", "version": 1}}},
                 id="object-value"),
    pytest.param("[{type: set, path: properties.flag, value: true}]",
                 {**TRACK, "properties": {"flag": 1}}, {**TRACK, "properties": {"flag": True}},
                 id="true-replaces-json-1"),
    pytest.param("[{type: set, path: properties.n, value: 0}]",
                 {**TRACK, "properties": {"n": False}}, {**TRACK, "properties": {"n": 0}},
                 id="0-replaces-json-false"),
]

REMOVE = "[{type: remove, paths: [properties.password, context.ip]}]"
REMOVE_CASES = [
    pytest.param(REMOVE, {**TRACK, "properties": {"password": "x", "a": 1}, "context": {"ip": "1"}},
                 {**TRACK, "properties": {"a": 1}, "context": {}}, id="both"),
    pytest.param(REMOVE, {**TRACK, "properties": {"password": None}},
                 {**TRACK, "properties": {}}, id="null-value-removed"),
    pytest.param(REMOVE, {**TRACK, "properties": {"a": 1}}, {**TRACK, "properties": {"a": 1}},
                 id="absent-same-object"),
    pytest.param(REMOVE, {**TRACK, "properties": "password"}, {**TRACK, "properties": "password"},
                 id="parent-not-object"),
    pytest.param(REMOVE, TRACK, TRACK, id="no-parents"),
]

RENAME = "[{type: rename, from: properties.userEmail, to: properties.email}]"
RENAME_CASES = [
    pytest.param(RENAME, {**TRACK, "properties": {"userEmail": "a@b.c", "k": 1}},
                 {**TRACK, "properties": {"email": "a@b.c", "k": 1}}, id="moves"),
    pytest.param(RENAME, {**TRACK, "properties": {"userEmail": "a@b.c", "email": "old"}},
                 {**TRACK, "properties": {"email": "a@b.c"}}, id="replaces-target"),
    pytest.param(RENAME, {**TRACK, "properties": {"userEmail": None}},
                 {**TRACK, "properties": {"email": None}}, id="moves-null"),
    pytest.param(RENAME, {**TRACK, "properties": {"email": "x"}},
                 {**TRACK, "properties": {"email": "x"}}, id="absent-same-object"),
    pytest.param("[{type: rename, from: traits.mail, to: context.traits.email}]",
                 {"type": "identify", "userId": "u1", "traits": {"mail": "m@x.y", "n": 1}},
                 {"type": "identify", "userId": "u1", "traits": {"n": 1},
                  "context": {"traits": {"email": "m@x.y"}}}, id="across-objects"),
]

RENAME_EVENT = '[{type: rename_event, from: signed_up, to: "Signed Up"}]'
RENAME_EVENT_CASES = [
    pytest.param(RENAME_EVENT, {**TRACK, "event": "signed_up"}, {**TRACK, "event": "Signed Up"},
                 id="renamed"),
    pytest.param(RENAME_EVENT, {**TRACK, "event": "Signed_up"}, {**TRACK, "event": "Signed_up"},
                 id="exact-name-only"),
    pytest.param(RENAME_EVENT, {**TRACK, "event": "signed_up_2"},
                 {**TRACK, "event": "signed_up_2"}, id="no-prefix-match"),
    pytest.param(RENAME_EVENT, {"type": "page", "userId": "u1", "name": "signed_up"},
                 {"type": "page", "userId": "u1", "name": "signed_up"}, id="track-only"),
]

DROP = '[{type: drop, when: {type: track, event: "Debug *"}}]'
DROP_CASES = [
    pytest.param(DROP, {**TRACK, "event": "Debug click"}, Drop("matched"), id="matched"),
    pytest.param(DROP, {**TRACK, "event": "Debugger"}, {**TRACK, "event": "Debugger"},
                 id="glob-needs-space"),
    pytest.param(DROP, {**TRACK, "event": "debug click"}, {**TRACK, "event": "debug click"},
                 id="case-sensitive"),
    pytest.param(DROP, {"type": "page", "userId": "u1", "event": "Debug x"},
                 {"type": "page", "userId": "u1", "event": "Debug x"}, id="other-type"),
    pytest.param("[{type: drop, when: {properties.env: {in: [dev, test]}}}]",
                 {**TRACK, "properties": {"env": "test"}}, Drop("matched"), id="by-property"),
]

ALLOW = ('[{type: allow_properties, events: {"Order Completed": [order_id, total],'
         ' "Plan *": [plan]}}]')
ORDER: Message = {**TRACK, "event": "Order Completed"}
ALLOW_CASES = [
    pytest.param(ALLOW, {**ORDER, "properties": {"order_id": "o1", "total": 9, "card": "4111"}},
                 {**ORDER, "properties": {"order_id": "o1", "total": 9}}, id="keeps-listed"),
    pytest.param(ALLOW, {**ORDER, "properties": {"order_id": "o1"}},
                 {**ORDER, "properties": {"order_id": "o1"}}, id="nothing-extra-same-object"),
    pytest.param(ALLOW, {**TRACK, "event": "Plan Changed", "properties": {"plan": "p", "s": 2}},
                 {**TRACK, "event": "Plan Changed", "properties": {"plan": "p"}}, id="glob"),
    pytest.param(ALLOW, {**TRACK, "event": "Other", "properties": {"x": 1}},
                 {**TRACK, "event": "Other", "properties": {"x": 1}}, id="other-event"),
    pytest.param(ALLOW, {"type": "page", "event": "Order Completed", "properties": {"x": 1}},
                 {"type": "page", "event": "Order Completed", "properties": {"x": 1}},
                 id="track-only"),
    pytest.param(ALLOW, ORDER, ORDER, id="no-properties"),
    pytest.param('[{type: allow_properties, events: {"Order *": [a], "Order Completed": [b]}}]',
                 {**ORDER, "properties": {"a": 1, "b": 2}}, {**ORDER, "properties": {"a": 1}},
                 id="first-matching-key"),
]


def hmac_hex(text: str) -> str:
    """What the hash rule must produce for `text` under HASH_KEY."""
    return hmac.new(HASH_KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


HASH = "[{type: hash, paths: [traits.email, context.traits.email, properties.n]}]"
IDENTIFY: Message = {"type": "identify", "userId": "u1"}
HASH_CASES = [
    pytest.param(HASH, {**IDENTIFY, "traits": {"email": "Jane@x.com", "name": "J"}},
                 {**IDENTIFY, "traits": {"email": hmac_hex("Jane@x.com"), "name": "J"}},
                 id="traits-email"),
    pytest.param(HASH,
                 {**TRACK, "context": {"traits": {"email": "a@b.c"}}, "properties": {"n": 42}},
                 {**TRACK, "context": {"traits": {"email": hmac_hex("a@b.c")}},
                  "properties": {"n": hmac_hex("42")}}, id="context-traits-and-number"),
    pytest.param(HASH, {**IDENTIFY, "traits": {"name": "J"}},
                 {**IDENTIFY, "traits": {"name": "J"}},
                 id="absent-same-object"),
    pytest.param(HASH, {**IDENTIFY, "traits": {"email": None}},
                 {**IDENTIFY, "traits": {"email": None}},
                 id="null-left-alone"),
]

NORMALIZE = "[{type: normalize_traits}]"
NORMALIZE_CASES = [
    pytest.param(NORMALIZE,
                 {**IDENTIFY, "traits": {"created_at": "t", "first_name": "J", "Last_Name": "D",
                                         "EMAIL": "j@x.com", "plan_name": "p"}},
                 {**IDENTIFY, "traits": {"createdAt": "t", "firstName": "J", "lastName": "D",
                                         "email": "j@x.com", "plan_name": "p"}},
                 id="identify-snake-and-other-cases"),
    pytest.param(NORMALIZE,
                 {"type": "group", "userId": "u1", "groupId": "g",
                  "traits": {"Employees": "10", "INDUSTRY": "x", "website": "w", "E-Mail": "e@x"}},
                 {"type": "group", "userId": "u1", "groupId": "g",
                  "traits": {"employees": "10", "industry": "x", "website": "w", "email": "e@x"}},
                 id="group-traits"),
    pytest.param(NORMALIZE, {**TRACK, "context": {"ip": "1", "traits": {"last_name": "D"}}},
                 {**TRACK, "context": {"ip": "1", "traits": {"lastName": "D"}}},
                 id="context-traits"),
    pytest.param(NORMALIZE, {**IDENTIFY, "traits": {"created_at": "snake", "createdAt": "camel"}},
                 {**IDENTIFY, "traits": {"createdAt": "camel"}}, id="camel-wins-after"),
    pytest.param(NORMALIZE, {**IDENTIFY, "traits": {"createdAt": "camel", "CREATED_AT": "x"}},
                 {**IDENTIFY, "traits": {"createdAt": "camel"}}, id="camel-wins-before"),
    pytest.param(NORMALIZE,
                 {**IDENTIFY, "traits": {"first_name": "a"},
                  "context": {"traits": {"firstName": "b", "first_name": "c"}}},
                 {**IDENTIFY, "traits": {"firstName": "a"},
                  "context": {"traits": {"firstName": "b"}}}, id="both-places"),
    pytest.param(NORMALIZE, {**IDENTIFY, "traits": {"createdAt": "t", "plan_name": "p"}},
                 {**IDENTIFY, "traits": {"createdAt": "t", "plan_name": "p"}},
                 id="already-camel-same-object"),
]

SIMPLE_CASES = (SET_CASES + REMOVE_CASES + RENAME_CASES + RENAME_EVENT_CASES + DROP_CASES
                + ALLOW_CASES + HASH_CASES + NORMALIZE_CASES)


@pytest.mark.parametrize(("rules", "message", "expected"), SET_CASES)
async def test_set(rules: str, message: Message, expected: Expected, state: SqliteState) -> None:
    """`set` writes its value at the path, creating parents; an equal value changes nothing."""
    check(await run(load(rules), state, message), message, expected)


@pytest.mark.parametrize(("rules", "message", "expected"), REMOVE_CASES)
async def test_remove(rules: str, message: Message, expected: Expected,
                      state: SqliteState) -> None:
    """`remove` deletes each listed path that is present and leaves absent ones alone."""
    check(await run(load(rules), state, message), message, expected)


@pytest.mark.parametrize(("rules", "message", "expected"), RENAME_CASES)
async def test_rename(rules: str, message: Message, expected: Expected,
                      state: SqliteState) -> None:
    """`rename` moves the value at `from` to `to`; an absent `from` changes nothing."""
    check(await run(load(rules), state, message), message, expected)


@pytest.mark.parametrize(("rules", "message", "expected"), RENAME_EVENT_CASES)
async def test_rename_event(rules: str, message: Message, expected: Expected,
                            state: SqliteState) -> None:
    """`rename_event` renames track events named exactly `from`, nothing else."""
    check(await run(load(rules), state, message), message, expected)


@pytest.mark.parametrize(("rules", "message", "expected"), DROP_CASES)
async def test_drop(rules: str, message: Message, expected: Expected, state: SqliteState) -> None:
    """`drop` drops exactly the messages its `when:` matches, with reason `matched`."""
    check(await run(load(rules), state, message), message, expected)


@pytest.mark.parametrize(("rules", "message", "expected"), ALLOW_CASES)
async def test_allow_properties(rules: str, message: Message, expected: Expected,
                                state: SqliteState) -> None:
    """`allow_properties` keeps only the listed properties of track events matching a key."""
    check(await run(load(rules), state, message), message, expected)


@pytest.mark.parametrize(("rules", "message", "expected"), HASH_CASES)
async def test_hash(rules: str, message: Message, expected: Expected, state: SqliteState,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`hash` replaces each present path by the hex HMAC-SHA256 of its value under the env key."""
    monkeypatch.setenv("RELAY_HASH_KEY", HASH_KEY)
    check(await run(load(rules), state, message), message, expected)


async def test_hash_without_key_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hash` with its key variable unset is refused at load time, pointing at key_env."""
    monkeypatch.delenv("RELAY_HASH_KEY", raising=False)
    with pytest.raises(config.ConfigError) as caught:
        load("[{type: hash, paths: [traits.email]}]")
    assert caught.value.errors == [
        "t.yaml:2: rules[0].key_env: environment variable RELAY_HASH_KEY must hold a secret"
        " of at least 16 characters"]


@pytest.mark.parametrize(("rules", "message", "expected"), NORMALIZE_CASES)
async def test_normalize_traits(rules: str, message: Message, expected: Expected,
                                state: SqliteState) -> None:
    """`normalize_traits` gives reserved traits their camelCase name; camelCase wins a clash."""
    check(await run(load(rules), state, message), message, expected)


SAMPLE_CASES = [
    pytest.param(0, 0, 0, id="rate-0-drops-all"),
    pytest.param(1, 2000, 2000, id="rate-1-keeps-all"),
    pytest.param(0.25, 400, 600, id="rate-quarter"),
    pytest.param(0.5, 900, 1100, id="rate-half"),
]


@pytest.mark.parametrize(("rate", "low", "high"), SAMPLE_CASES)
async def test_sample(rate: float, low: int, high: int, state: SqliteState) -> None:
    """`sample` keeps about `rate` of 2000 users, dropping the rest with reason sampled_out."""
    cfg = load(f"[{{type: sample, rate: {rate}}}]")
    kept = 0
    for n in range(2000):
        message = {**TRACK, "userId": f"user-{n}"}
        outcome = await run(cfg, state, message)
        if outcome.message is None:
            assert outcome.reason == "sampled_out"
        else:
            assert outcome.message is message
            kept += 1
    assert low <= kept <= high


async def test_sample_is_deterministic_per_user(state: SqliteState) -> None:
    """`sample` gives every message of a user (by userId, else anonymousId) the same verdict."""
    cfg = load("[{type: sample, rate: 0.5}]")
    for n in range(200):
        verdicts = set()
        for message in ({**TRACK, "userId": f"u{n}"},
                        {"type": "identify", "userId": f"u{n}", "anonymousId": "x"},
                        {"type": "page", "userId": f"u{n}", "name": "Home"}):
            verdicts.add((await run(cfg, state, message)).message is None)
        anonymous = {(await run(cfg, state, {"type": "track", "anonymousId": f"a{n}",
                                             "event": e})).message is None for e in "ABC"}
        assert len(verdicts) == 1
        assert len(anonymous) == 1


# one_group_per_user: each case is a sequence of (message, expected) over one state.
G = "[{type: one_group_per_user}]"


def group_call(group: str, hour: int, **ids: str) -> Message:
    """A group call putting the user named by `ids` into `group` at `hour`."""
    return {"type": "group", "groupId": group, "timestamp": at(hour), **ids}


PAGE: Message = {"type": "page", "userId": "u1", "name": "Home"}
SCREEN: Message = {"type": "screen", "userId": "u1", "name": "Main"}
ANON_TRACK: Message = {"type": "track", "anonymousId": "a1", "event": "Clicked"}
ONE_GROUP_CASES = [
    pytest.param(G, [(group_call("G1", 9, userId="u1"), group_call("G1", 9, userId="u1")),
                     (TRACK, grouped(TRACK, "G1")), (PAGE, grouped(PAGE, "G1")),
                     (SCREEN, grouped(SCREEN, "G1")), (IDENTIFY, IDENTIFY)],
                 id="by-user-id-default-types"),
    pytest.param(G, [(TRACK, TRACK)], id="no-group-known-same-object"),
    pytest.param(G, [(group_call("G1", 9, anonymousId="a1"), group_call("G1", 9, anonymousId="a1")),
                     (ANON_TRACK, grouped(ANON_TRACK, "G1")), (TRACK, TRACK)],
                 id="by-anonymous-id-when-no-user-id"),
    pytest.param(G, [(group_call("G1", 9, userId="u1", anonymousId="a1"),
                      group_call("G1", 9, userId="u1", anonymousId="a1")),
                     ({**TRACK, "anonymousId": "a2"},
                      grouped({**TRACK, "anonymousId": "a2"}, "G1")),
                     (ANON_TRACK, ANON_TRACK)],
                 id="user-id-preferred-over-anonymous-id"),
    pytest.param(G, [(group_call("G1", 9, userId="u1"), group_call("G1", 9, userId="u1")),
                     (group_call("G2", 11, userId="u1"), group_call("G2", 11, userId="u1")),
                     (TRACK, grouped(TRACK, "G2"))], id="newer-group-switches"),
    pytest.param(G, [(group_call("G1", 10, userId="u1"), group_call("G1", 10, userId="u1")),
                     (group_call("G2", 8, userId="u1"), group_call("G2", 8, userId="u1")),
                     (TRACK, grouped(TRACK, "G1")),
                     (group_call("G3", 12, userId="u1"), group_call("G3", 12, userId="u1")),
                     (TRACK, grouped(TRACK, "G3"))], id="late-older-group-does-not-flip-back"),
    pytest.param(G, [({**group_call("G1", 0, userId="u1"), "timestamp": "2024-05-01T09:00:00Z"},
                      {**group_call("G1", 0, userId="u1"), "timestamp": "2024-05-01T09:00:00Z"}),
                     ({**group_call("G2", 0, userId="u1"),
                       "timestamp": "2024-05-01T10:00:00+02:00"},
                      {**group_call("G2", 0, userId="u1"),
                       "timestamp": "2024-05-01T10:00:00+02:00"}),
                     (TRACK, grouped(TRACK, "G1"))], id="time-compared-not-text"),
    pytest.param(G, [(group_call("G1", 9, userId="u1"), group_call("G1", 9, userId="u1")),
                     (grouped(TRACK, "X"), grouped(TRACK, "X")),
                     ({**TRACK, "context": {"ip": "1"}}, {**TRACK, "context": {"ip": "1",
                                                                               "groupId": "G1"}})],
                 id="explicit-group-kept"),
    pytest.param("[{type: one_group_per_user, inject_into: [identify, page]}]",
                 [(group_call("G1", 9, userId="u1"), group_call("G1", 9, userId="u1")),
                  (TRACK, TRACK), (IDENTIFY, grouped(IDENTIFY, "G1")), (PAGE, grouped(PAGE, "G1")),
                  (SCREEN, SCREEN)], id="inject-into"),
    pytest.param(G, [(group_call("G1", 9, anonymousId="a1"), group_call("G1", 9, anonymousId="a1")),
                     ({"type": "alias", "previousId": "a1", "userId": "u1", "timestamp": at(10)},
                      {"type": "alias", "previousId": "a1", "userId": "u1", "timestamp": at(10)}),
                     (TRACK, grouped(TRACK, "G1"))], id="alias-carries-anonymous-group"),
    pytest.param(G, [(group_call("G1", 9, userId="old"), group_call("G1", 9, userId="old")),
                     ({"type": "alias", "previousId": "old", "userId": "u1"},
                      {"type": "alias", "previousId": "old", "userId": "u1"}),
                     (TRACK, grouped(TRACK, "G1"))], id="alias-carries-old-user-group"),
    pytest.param(G, [(group_call("G1", 9, anonymousId="a1"), group_call("G1", 9, anonymousId="a1")),
                     (group_call("G2", 8, userId="u1"), group_call("G2", 8, userId="u1")),
                     ({"type": "alias", "previousId": "a1", "userId": "u1"},
                      {"type": "alias", "previousId": "a1", "userId": "u1"}),
                     (TRACK, grouped(TRACK, "G2"))], id="alias-keeps-new-ids-own-group"),
]


@pytest.mark.parametrize(("rules", "steps"), ONE_GROUP_CASES)
async def test_one_group_per_user(rules: str, steps: list[tuple[Message, Expected]],
                                  state: SqliteState) -> None:
    """`one_group_per_user` remembers the latest group per user and injects it."""
    await play(rules, state, steps)


STAFF_ID = {**TRACK, "userId": "staff-7"}
CUSTOMER = {**IDENTIFY, "traits": {"email": "jane@customer.com"}}


def identify(email: str, **ids: str) -> Message:
    """An identify call carrying `email` in traits."""
    return {"type": "identify", "traits": {"email": email}, **ids}


def track(**fields: Any) -> Message:
    """A track call with the given ids and fields."""
    return {"type": "track", "event": "Clicked", **fields}


DETECTION_CASES = [
    pytest.param(STAFF, [(STAFF_ID, INTERNAL)], id="listed-user-id"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="u1"), INTERNAL)], id="traits-email"),
    pytest.param(STAFF, [(track(userId="u1", context={"traits": {"Email": "bob@acme.io"}}),
                          INTERNAL)], id="context-traits-Email"),
    pytest.param(STAFF, [(track(userId="u1", properties={"EMAIL": "bob@acme.io"}), INTERNAL)],
                 id="properties-EMAIL"),
    pytest.param(STAFF, [({"type": "identify", "userId": "u1", "traits": {"e_mail": "b@acme.io"}},
                          INTERNAL)], id="traits-e_mail"),
    pytest.param(STAFF, [(track(userId="bob@acme.io"), INTERNAL)], id="user-id-is-email"),
    pytest.param(STAFF, [(identify("bob@eu.dev.acme.io", userId="u1"), INTERNAL)],
                 id="subdomain"),
    pytest.param(STAFF, [(identify("BOB@EU.Acme.IO", userId="u1"), INTERNAL)], id="any-case"),
    pytest.param("[{type: drop_internal_users, email_domains: [ACME.io]}]",
                 [(identify("bob@acme.io", userId="u1"), INTERNAL)], id="domain-option-any-case"),
    pytest.param(STAFF, [(identify("bob@notacme.io", userId="u1"),
                          identify("bob@notacme.io", userId="u1")),
                         (identify("bob@acme.io.evil.com", userId="u2"),
                          identify("bob@acme.io.evil.com", userId="u2"))],
                 id="not-a-subdomain"),
    pytest.param(STAFF, [(CUSTOMER, CUSTOMER), (TRACK, TRACK)], id="customer-kept-same-object"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="u1"), INTERNAL), (TRACK, INTERNAL),
                         (PAGE, INTERNAL)], id="remembered-by-user-id"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="u1", anonymousId="a1"), INTERNAL),
                         (ANON_TRACK, INTERNAL)], id="identify-links-anonymous-id"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="u1"), INTERNAL),
                         ({"type": "identify", "userId": "u1", "anonymousId": "a1"}, INTERNAL),
                         (ANON_TRACK, INTERNAL)], id="later-identify-links-anonymous-id"),
    pytest.param(STAFF, [(track(anonymousId="a1", properties={"email": "bob@acme.io"}), INTERNAL),
                         ({"type": "identify", "userId": "u1", "anonymousId": "a1"}, INTERNAL),
                         (TRACK, INTERNAL)], id="anonymous-verdict-reaches-user-id"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="u1"), INTERNAL),
                         ({"type": "alias", "previousId": "a1", "userId": "u1"}, INTERNAL),
                         (ANON_TRACK, INTERNAL)], id="alias-links-anonymous-id"),
    pytest.param(STAFF, [(track(anonymousId="a1", context={"traits": {"email": "b@acme.io"}}),
                          INTERNAL),
                         ({"type": "alias", "previousId": "a1", "userId": "u1"}, INTERNAL),
                         (TRACK, INTERNAL)], id="alias-carries-anonymous-verdict"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="old"), INTERNAL),
                         ({"type": "alias", "previousId": "old", "userId": "u1"}, INTERNAL),
                         (TRACK, INTERNAL)], id="alias-carries-old-user-id-verdict"),
    pytest.param(STAFF, [(track(anonymousId="a1"), track(anonymousId="a1")),
                         ({"type": "identify", "userId": "u1", "anonymousId": "a1"},
                          {"type": "identify", "userId": "u1", "anonymousId": "a1"}),
                         (identify("bob@acme.io", userId="u1"), INTERNAL),
                         (track(anonymousId="a1"), INTERNAL)],
                 id="verdict-reaches-earlier-linked-anonymous-id"),
    pytest.param(STAFF, [(identify("bob@acme.io", userId="u1"), INTERNAL),
                         (track(anonymousId="a9"), track(anonymousId="a9")),
                         (track(userId="u2"), track(userId="u2"))], id="others-unaffected"),
]

HQ = "acme-hq"
OWN_GROUP_CASES = [
    pytest.param(STAFF, [(grouped(STAFF_ID, HQ), grouped(STAFF_ID, HQ)),
                         ({"type": "group", "userId": "staff-7", "groupId": HQ},
                          {"type": "group", "userId": "staff-7", "groupId": HQ}),
                         ({"type": "group", "userId": "staff-7", "groupId": "cust-1",
                           "context": {"groupId": HQ}}, INTERNAL),
                         (grouped(STAFF_ID, "cust-1"), INTERNAL)],
                 id="explicit-groups"),
    pytest.param(B2B, [(identify("bob@acme.io", userId="u1"), INTERNAL),
                       (group_call(HQ, 9, userId="u1"), group_call(HQ, 9, userId="u1")),
                       (TRACK, grouped(TRACK, HQ)),
                       (identify("bob@acme.io", userId="u1"), identify("bob@acme.io", userId="u1")),
                       (group_call("cust-1", 10, userId="u1"), INTERNAL),
                       (TRACK, INTERNAL),
                       (PAGE, INTERNAL),
                       (grouped(TRACK, HQ), grouped(TRACK, HQ))],
                 id="staff-joins-customer-next-track-dropped"),
    pytest.param("[{type: one_group_per_user, inject_into: [page]},"
                 " {type: drop_internal_users, user_ids: [u1], own_groups: [acme-hq]}]",
                 [(group_call(HQ, 9, userId="u1"), group_call(HQ, 9, userId="u1")),
                  (TRACK, TRACK),
                  (group_call("cust-1", 10, userId="u1"), INTERNAL),
                  (TRACK, INTERNAL)],
                 id="remembered-group-without-injection"),
    pytest.param(B2B, [(group_call("cust-1", 9, userId="c1"), group_call("cust-1", 9, userId="c1")),
                       ({**TRACK, "userId": "c1"}, grouped({**TRACK, "userId": "c1"}, "cust-1"))],
                 id="customer-in-customer-group-kept"),
    pytest.param(B2B, [(identify("bob@acme.io", userId="u1", anonymousId="a1"), INTERNAL),
                       (group_call(HQ, 9, anonymousId="a1"), group_call(HQ, 9, anonymousId="a1")),
                       (ANON_TRACK, grouped(ANON_TRACK, HQ)),
                       (group_call("cust-1", 10, anonymousId="a1"), INTERNAL),
                       (ANON_TRACK, INTERNAL)], id="by-linked-anonymous-id"),
]


@pytest.mark.parametrize(("rules", "steps"), DETECTION_CASES + OWN_GROUP_CASES)
async def test_drop_internal_users(rules: str, steps: list[tuple[Message, Expected]],
                                   state: SqliteState) -> None:
    """`drop_internal_users` finds, remembers and drops staff outside own_groups."""
    await play(rules, state, steps)


def commit(db: Path, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
    """What the outbox does with state writes: execute them all in one committed transaction."""
    with sqlite3.connect(db) as conn:
        for sql, rows in statements:
            conn.executemany(sql, rows)
    conn.close()


async def reopened(state: SqliteState, db: Path, committed: bool) -> SqliteState:
    """Closes `state`, commits its drained writes if `committed`, and opens the file again."""
    statements = state.drain()
    assert statements != []
    await state.close()
    if committed:
        commit(db, statements)
    fresh = SqliteState(str(db))
    await fresh.open()
    return fresh


@pytest.mark.parametrize("committed", [True, False])
async def test_group_survives_restart_once_committed(tmp_path: Path, committed: bool) -> None:
    """A user's current group and its time are remembered after reopening only if committed."""
    db = tmp_path / "s.db"
    cfg = load(B2B)
    first = SqliteState(str(db))
    await first.open()
    await run(cfg, first, group_call("G1", 10, userId="u1"))
    await run(cfg, first, group_call("GA", 10, anonymousId="a1"))
    second = await reopened(first, db, committed)
    try:
        late = await run(cfg, second, group_call("G0", 8, userId="u1"))
        assert late.message == group_call("G0", 8, userId="u1")
        after = await run(cfg, second, TRACK)
        anonymous = await run(cfg, second, ANON_TRACK)
        if committed:
            assert after.message == grouped(TRACK, "G1")
            assert anonymous.message == grouped(ANON_TRACK, "GA")
        else:
            assert after.message == grouped(TRACK, "G0")
            assert anonymous.message is ANON_TRACK
    finally:
        await second.close()


@pytest.mark.parametrize("committed", [True, False])
async def test_internal_verdict_survives_restart_once_committed(tmp_path: Path,
                                                                committed: bool) -> None:
    """A staff verdict, by userId and linked anonymousId, outlives a reopen only if committed."""
    db = tmp_path / "s.db"
    cfg = load(B2B)
    first = SqliteState(str(db))
    await first.open()
    dropped = await run(cfg, first, identify("bob@acme.io", userId="u1", anonymousId="a1"))
    assert dropped.reason == "internal_user"
    second = await reopened(first, db, committed)
    try:
        for message in (TRACK, ANON_TRACK, {"type": "identify", "userId": "u1"}):
            outcome = await run(cfg, second, message)
            if committed:
                assert (outcome.message, outcome.reason) == (None, "internal_user")
            else:
                assert (outcome.message, outcome.reason) == (message, None)
    finally:
        await second.close()


async def test_staff_in_customer_group_survives_restart(tmp_path: Path) -> None:
    """After a committed restart, a staff member who joined a customer's group is still dropped."""
    db = tmp_path / "s.db"
    cfg = load(B2B)
    first = SqliteState(str(db))
    await first.open()
    await run(cfg, first, identify("bob@acme.io", userId="u1", anonymousId="a1"))
    assert (await run(cfg, first, group_call("cust-1", 10, userId="u1"))).reason == "internal_user"
    second = await reopened(first, db, committed=True)
    try:
        assert (await run(cfg, second, TRACK)).reason == "internal_user"
        kept = await run(cfg, second, grouped(TRACK, HQ))
        assert kept.message == grouped(TRACK, HQ)
    finally:
        await second.close()


async def test_verdict_reaches_anonymous_id_linked_before_restart(tmp_path: Path) -> None:
    """An anonymousId linked and committed before a restart is dropped once its user is staff."""
    db = tmp_path / "s.db"
    cfg = load(STAFF)
    first = SqliteState(str(db))
    await first.open()
    link = {"type": "identify", "userId": "u1", "anonymousId": "a1"}
    assert (await run(cfg, first, link)).message is link
    second = await reopened(first, db, committed=True)
    try:
        assert (await run(cfg, second, ANON_TRACK)).message is ANON_TRACK
        assert (await run(cfg, second, identify("bob@acme.io", userId="u1"))).reason \
            == "internal_user"
        assert (await run(cfg, second, ANON_TRACK)).reason == "internal_user"
    finally:
        await second.close()


def test_event_time_past_datetimes_years_in_utc_falls_back_to_received_at() -> None:
    """A timestamp that reads as a time but lies before year 1 once put in UTC gives way to
    receivedAt as the event time, instead of failing the rule that asked for it."""
    message = {"timestamp": "0001-01-01T00:00:00+05:00", "receivedAt": "2026-12-07T03:00:00.000Z"}
    assert identity.event_time(message) == "2026-12-07T03:00:00.000Z"
    assert identity.event_time({"timestamp": "2026-12-07T03:00:00+01:00"}) == (
        "2026-12-07T02:00:00.000Z")
    assert identity.event_time({"timestamp": "2026-12-07T03:00:00.123456+00:00"}) == (
        "2026-12-07T03:00:00.123Z")
    assert identity.event_time({"timestamp": "soon", "receivedAt": "2026-12-07T03:00:00Z"}) == (
        "2026-12-07T03:00:00.000Z")


async def test_an_anonymous_id_found_internal_marks_the_user_it_is_linked_to(state):
    """One verdict for all of a user's ids, whichever is seen first: an anonymousId linked to a
    userId and later seen with a staff email makes that userId internal too (as marking the
    userId first, then linking, would), so their email-less tracks are dropped."""
    cfg = load(STAFF)
    linked = identify("bob@customer.example", userId="u1", anonymousId="a1")
    check(await run(cfg, state, linked), linked, linked)
    staff = track(anonymousId="a1", properties={"email": "bob@acme.io"})
    check(await run(cfg, state, staff), staff, INTERNAL)
    check(await run(cfg, state, track(userId="u1")), {}, INTERNAL)
    other = track(anonymousId="a2", userId="u1")
    check(await run(cfg, state, other), {}, INTERNAL)


async def test_an_anonymous_id_linked_to_another_user_leaves_the_first_ones_verdict(state):
    """An anonymousId moved from u1 to u2 (a later call carries it with u2) is no longer u1's:
    u1 found internal afterwards does not make it, or u2's tracks, internal."""
    cfg = load(STAFF)
    for message in (identify("a@customer.example", userId="u1", anonymousId="a1"),
                    identify("b@customer.example", userId="u2", anonymousId="a1")):
        check(await run(cfg, state, message), message, message)
    check(await run(cfg, state, identify("a@acme.io", userId="u1")), {}, INTERNAL)
    for message in (track(anonymousId="a1"), track(userId="u2")):
        check(await run(cfg, state, message), message, message)
