"""`when:` conditions, their config errors, and the pipeline's semantics around the rules."""

from __future__ import annotations

import copy
import logging
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.config import model as config
from relay.pipeline import condition as condition_module
from relay.pipeline.runner import Drop, Message, Pipeline, RuleContext, Step
from relay.state.sqlite import SqliteState

UPSTREAM = 'upstreams: [{name: u, kind: segment, url: "http://127.0.0.1:9"}]\n'
TRACK: Message = {"type": "track", "userId": "u1", "event": "Clicked"}


def load(rules: str, top: str = "") -> config.Config:
    """The config with `rules` (YAML lines under `rules:`, from line 3 on when `top` is empty)."""
    return config.parse("t.yaml", UPSTREAM + top + "rules:\n" + textwrap.dedent(rules))


def when(condition: str) -> Any:
    """The compiled `when:` of a `drop` rule whose condition is the flow YAML `condition`."""
    step = load(f"  - {{type: drop, when: {condition}}}\n").rules[0]
    assert step.when is not None
    return step.when


def errors(rules: str, top: str = "") -> list[str]:
    """The `file:line: path: message` errors loading `rules` reports."""
    with pytest.raises(config.ConfigError) as caught:
        load(rules, top)
    return caught.value.errors


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[SqliteState]:
    """A SqliteState on a real SQLite file, schema created by open()."""
    opened = SqliteState(str(tmp_path / "s.db"))
    await opened.open()
    yield opened
    await opened.close()


def track(**fields: Any) -> Message:
    """A track call for u1 with `fields` added."""
    return {**TRACK, **fields}


def props(**values: Any) -> Message:
    """A track call with these properties."""
    return track(properties=values)


CONDITION_CASES = [
    ("{type: track}", TRACK, True),
    ("{type: track}", {"type": "page", "userId": "u1"}, False),
    ("{type: [track, page]}", {"type": "page", "userId": "u1"}, True),
    ("{type: [track, page]}", {"type": "identify", "userId": "u1"}, False),
    ('{event: "Debug *"}', track(event="Debug click"), True),
    ('{event: "Debug *"}', track(event="Debugger"), False),
    ('{event: "Debug *"}', track(event="debug click"), False),
    ('{event: "Debug *"}', track(event="My Debug click"), False),
    ('{event: "Debug *"}', {"type": "page", "userId": "u1"}, False),
    ('{event: ["A*", "B?"]}', track(event="Alpha"), True),
    ('{event: ["A*", "B?"]}', track(event="Bc"), True),
    ('{event: ["A*", "B?"]}', track(event="Bcd"), False),
    ("{properties.plan: pro}", props(plan="pro"), True),
    ("{properties.plan: pro}", props(plan="Pro"), False),
    ("{properties.plan: pro}", TRACK, False),
    ("{properties.plan: {equals: pro}}", props(plan="pro"), True),
    ("{properties.plan: {equals: pro}}", props(plan="team"), False),
    ("{context.app.name: web}", track(context={"app": {"name": "web"}}), True),
    ("{context.app.name: web}", track(context={"app": "web"}), False),
    ("{properties.n: 1}", props(n=1), True),
    ("{properties.n: 1}", props(n=1.0), True),
    ("{properties.n: 1}", props(n=True), False),
    ('{properties.n: 1}', props(n="1"), False),
    ("{properties.n: {equals: 1}}", props(n=True), False),
    ("{properties.flag: true}", props(flag=True), True),
    ("{properties.flag: true}", props(flag=1), False),
    ("{properties.n: {equals: [1]}}", props(n=[1]), True),
    ("{properties.n: {equals: [1]}}", props(n=[True]), False),
    ("{properties.n: {equals: {a: 1}}}", props(n={"a": True}), False),
    ("{properties.plan: {in: [pro, team]}}", props(plan="team"), True),
    ("{properties.plan: {in: [pro, team]}}", props(plan="free"), False),
    ("{properties.plan: {in: [pro, team]}}", TRACK, False),
    ("{properties.n: {in: [1, 2]}}", props(n=True), False),
    ("{properties.n: {in: [1, 2]}}", props(n=2), True),
    ("{context.groupId: {exists: true}}", track(context={"groupId": "g"}), True),
    ("{context.groupId: {exists: true}}", TRACK, False),
    ("{context.groupId: {exists: false}}", TRACK, True),
    ("{context.groupId: {exists: false}}", track(context={"groupId": "g"}), False),
    ('{userId: {matches: "@acme\\\\.io$"}}', track(userId="bob@acme.io"), True),
    ('{userId: {matches: "@acme\\\\.io$"}}', track(userId="bob@acmexio"), False),
    ('{userId: {matches: "@acme\\\\.io$"}}', track(userId="bob@acme.io.x"), False),
    ('{userId: {matches: "acme"}}', track(userId=7), False),
    ('{properties.plan: {matches: "ro"}}', props(plan="pro"), True),
    ('{properties.plan: {exists: true, matches: "^p"}}', props(plan="team"), False),
    ('{not: {event: "Debug *"}}', track(event="Debug x"), False),
    ('{not: {event: "Debug *"}}', track(event="Click"), True),
    ('{any: [{type: page}, {event: "Sign*"}]}', {"type": "page", "userId": "u1"}, True),
    ('{any: [{type: page}, {event: "Sign*"}]}', track(event="Signed Up"), True),
    ('{any: [{type: page}, {event: "Sign*"}]}', track(event="Click"), False),
    ('[{type: track}, {event: "A*"}]', track(event="A1"), True),
    ('[{type: track}, {event: "A*"}]', {"type": "page", "event": "A1"}, False),
    ('[{type: track}, {event: "A*"}]', track(event="B1"), False),
    ("{type: track, properties.plan: pro}", props(plan="pro"), True),
    ("{type: page, properties.plan: pro}", props(plan="pro"), False),
]


@pytest.mark.parametrize(("condition", "message", "matches"), CONDITION_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CONDITION_CASES)])
def test_condition(condition: str, message: Message, matches: bool) -> None:
    """A `when:` matches exactly the messages its operators say, with type-strict equality."""
    before = copy.deepcopy(message)
    assert when(condition).matches(message) is matches
    assert message == before


def test_event_glob_verdicts_stay_right_past_the_names_it_remembers() -> None:
    """An `event:` glob remembers its verdict per event name; with more names than it keeps
    (it starts over) every verdict is still the glob's, asked twice each."""
    condition = when('{event: "Debug *"}')
    names = [f"Debug {i}" if i % 3 == 0 else f"Click {i}"
             for i in range(condition_module.EVENTS_REMEMBERED * 2 + 5)]
    for _ in range(2):
        verdicts = [condition.matches(track(event=name)) for name in names]
        assert verdicts == [name.startswith("Debug ") for name in names]


OPERATORS = "equals, in, exists, matches"
CONFIG_ERROR_CASES = [
    pytest.param("""\
          - type: set
            path: context.app.name
            value: web
          - type: drop
            when:
              type: track
              properties.plan: {equal: pro}
        """, [f"t.yaml:9: rules[1].when.properties.plan.equal: unknown operator; use one of"
              f" {OPERATORS} (did you mean 'equals'?)"], id="unknown-operator-did-you-mean"),
    pytest.param("""\
          - type: drop
            when: {userId: {matches: "(unclosed"}}
        """, ["t.yaml:4: rules[0].when.userId.matches: not a valid regular expression:"
              " missing ), unterminated subpattern at position 0"], id="bad-regex"),
    pytest.param("""\
          - type: drop
            when:
              userId:
                matches: 5
        """, ["t.yaml:6: rules[0].when.userId.matches: must be a regular expression"
              " (a string)"], id="regex-not-string"),
    pytest.param("""\
          - type: drop
            when:
              properties.plan:
                in: pro
        """, ["t.yaml:6: rules[0].when.properties.plan.in: must be a list of values"],
                 id="in-not-list"),
    pytest.param("""\
          - type: drop
            when:
              context.groupId:
                exists: "yes"
        """, ["t.yaml:6: rules[0].when.context.groupId.exists: must be true or false"],
                 id="exists-not-bool"),
    pytest.param("""\
          - type: drop
            when: track
        """, ["t.yaml:4: rules[0].when: a condition is a mapping (like {type: track}) or a list"
              " of them"], id="when-a-string"),
    pytest.param("""\
          - type: drop
            when: {}
        """, ["t.yaml:4: rules[0].when: a condition is a mapping (like {type: track}) or a list"
              " of them"], id="when-empty-mapping"),
    pytest.param("""\
          - type: drop
            when: [{type: track}, 5]
        """, ["t.yaml:4: rules[0].when[1]: a condition is a mapping (like {type: track}) or a"
              " list of them"], id="list-item-not-mapping"),
    pytest.param("""\
          - type: drop
            when:
              type: 5
        """, ["t.yaml:5: rules[0].when.type: must be a string or a list of strings"],
                 id="type-not-string"),
    pytest.param("""\
          - type: drop
            when:
              event: [1]
        """, ["t.yaml:5: rules[0].when.event: must be a glob like 'Debug *' or a list of them"],
                 id="event-not-glob"),
    pytest.param("""\
          - type: drop
            when:
              any: {type: track}
        """, ["t.yaml:5: rules[0].when.any: must be a non-empty list of conditions"],
                 id="any-not-list"),
    pytest.param("""\
          - type: drop
            when:
              not: 5
        """, ["t.yaml:5: rules[0].when.not: a condition is a mapping (like {type: track}) or a"
              " list of them"], id="not-not-condition"),
    pytest.param("""\
          - type: drop
            when:
              properties..plan: pro
        """, ["t.yaml:5: rules[0].when.properties..plan: expected type, event, not, any, or a"
              " dotted path like properties.x"], id="empty-path-part"),
    pytest.param("""\
          - type: drop
            when: {exists: maybe, properties.x: {in: 1}}
          - type: set
            path: a
            value: 1
            when:
              properties.y: {matchs: "x"}
        """, ["t.yaml:4: rules[0].when.properties.x.in: must be a list of values",
              f"t.yaml:9: rules[1].when.properties.y.matchs: unknown operator; use one of"
              f" {OPERATORS} (did you mean 'matches'?)"], id="all-errors-in-line-order"),
]


@pytest.mark.parametrize(("rules", "expected"), CONFIG_ERROR_CASES)
def test_condition_config_errors(rules: str, expected: list[str]) -> None:
    """A bad `when:` is a config error reported as `file:line: path: message`."""
    assert errors(rules) == expected


@pytest.mark.parametrize(("condition", "path"), [
    pytest.param("[]", "rules[0].when", id="empty-all-of-list"),
    pytest.param("{properties.x: {}}", "rules[0].when.properties.x", id="empty-operators"),
])
def test_empty_conditions_are_config_errors(condition: str, path: str) -> None:
    """A `when:` that says nothing (empty list, no operators) is refused, not match-everything."""
    found = errors(f"  - {{type: drop, when: {condition}}}\n")
    assert len(found) == 1
    assert found[0].startswith(f"t.yaml:3: {path}: ")


def test_drop_without_when_is_config_error() -> None:
    """A `drop` rule with no `when:` is refused, pointing at the rule's line."""
    assert errors("  - type: set\n    path: a\n    value: 1\n  - type: drop\n") == [
        "t.yaml:6: rules[1]: a 'drop' rule needs a 'when:' saying which messages it applies to"]


def test_duplicate_rule_id_is_config_error() -> None:
    """Two rules with the same `id:` are refused at the second one's id."""
    assert errors("  - {type: drop, id: x, when: {type: page}}\n"
                  "  - {type: drop, id: x, when: {type: screen}}\n") == [
        "t.yaml:4: rules[1].id: another rule has the id 'x'"]


async def test_ids_default_to_type_and_index(state: SqliteState) -> None:
    """Rule ids default to `type#index` (index in the YAML list) and show in changed_by."""
    cfg = load("""\
      - {type: set, path: context.app.name, value: web}
      - {type: set, path: properties.a, value: 1, id: tag-a}
      - {type: rename_event, from: x, to: y}
      - {type: remove, paths: [properties.b]}
    """)
    assert [step.id for step in cfg.rules] == ["set#0", "tag-a", "rename_event#2", "remove#3"]
    message = track(event="x", properties={"b": 2})
    outcome = await Pipeline(cfg.rules).run(message, RuleContext(state=state))
    assert outcome.changed_by == ["set#0", "tag-a", "rename_event#2", "remove#3"]
    assert outcome.message == track(event="y", properties={"a": 1},
                                    context={"app": {"name": "web"}})
    assert (outcome.dropped_by, outcome.reason) == (None, None)


async def test_dropped_by_names_the_rule(state: SqliteState) -> None:
    """A drop records the dropping rule's id (default or explicit) and its reason."""
    cfg = load("""\
      - {type: set, path: context.app.name, value: web}
      - {type: drop, when: {event: "Debug *"}}
      - {type: drop, id: no-pages, when: {type: page}}
    """)
    pipeline = Pipeline(cfg.rules)
    debug = await pipeline.run(track(event="Debug x"), RuleContext(state=state))
    assert (debug.message, debug.dropped_by, debug.reason) == (None, "drop#1", "matched")
    assert debug.changed_by == ["set#0"]
    page = await pipeline.run({"type": "page", "userId": "u1"}, RuleContext(state=state))
    assert (page.message, page.dropped_by, page.reason) == (None, "no-pages", "matched")


async def test_rule_whose_when_fails_is_skipped(state: SqliteState) -> None:
    """A rule whose `when:` does not match leaves the message as it is, the very same object."""
    cfg = load("  - {type: set, path: properties.x, value: 1, when: {type: page}}\n")
    pipeline = Pipeline(cfg.rules)
    skipped = await pipeline.run(TRACK, RuleContext(state=state))
    assert skipped.message is TRACK
    assert skipped.changed_by == []
    page: Message = {"type": "page", "userId": "u1"}
    applied = await pipeline.run(page, RuleContext(state=state))
    assert applied.message == {**page, "properties": {"x": 1}}
    assert applied.changed_by == ["set#0"]


@dataclass(frozen=True)
class Boom:
    """A rule (Rule protocol) that always raises."""

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        raise RuntimeError("boom")


async def test_skipped_rule_is_never_applied(state: SqliteState,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A raising rule behind a non-matching `when:` is never called, so nothing is logged."""
    page_only = load("  - {type: drop, when: {type: page}}\n").rules[0].when
    pipeline = Pipeline([Step("boom", Boom(), when=page_only)], on_error="drop")
    outcome = await pipeline.run(TRACK, RuleContext(state=state))
    assert (outcome.message, outcome.dropped_by) == (TRACK, None)
    assert caplog.records == []


async def test_raising_rule_passes_message_unchanged(state: SqliteState,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """With on_rule_error pass, a raising rule is logged with its id and later rules still run."""
    cfg = load("  - {type: set, path: context.app.name, value: web}\n")
    assert cfg.on_rule_error == "pass"
    pipeline = Pipeline([Step("boom", Boom()), *cfg.rules], cfg.on_rule_error)
    message = track(messageId="m-1")
    with caplog.at_level(logging.ERROR, logger="relay.pipeline"):
        outcome = await pipeline.run(message, RuleContext(state=state))
    assert outcome.message == {**message, "context": {"app": {"name": "web"}}}
    assert outcome.changed_by == ["set#0"]
    assert (outcome.dropped_by, outcome.reason) == (None, None)
    assert message == track(messageId="m-1")
    [record] = caplog.records
    assert record.getMessage() == "rule boom failed on message m-1; on_rule_error: pass"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_raising_rule_alone_returns_same_message(state: SqliteState) -> None:
    """With on_rule_error pass, a lone raising rule yields the very message it was given."""
    outcome = await Pipeline([Step("boom", Boom())]).run(TRACK, RuleContext(state=state))
    assert outcome.message is TRACK
    assert (outcome.changed_by, outcome.dropped_by) == ([], None)


async def test_raising_rule_drops_with_on_rule_error_drop(
        state: SqliteState, caplog: pytest.LogCaptureFixture) -> None:
    """With on_rule_error drop (from YAML), a raising rule drops the message as rule_error."""
    cfg = load("  - {type: set, path: context.app.name, value: web}\n",
               top="on_rule_error: drop\n")
    assert cfg.on_rule_error == "drop"
    pipeline = Pipeline([*cfg.rules, Step("boom", Boom())], cfg.on_rule_error)
    with caplog.at_level(logging.ERROR, logger="relay.pipeline"):
        outcome = await pipeline.run(TRACK, RuleContext(state=state))
    assert (outcome.message, outcome.dropped_by, outcome.reason) == (None, "boom", "rule_error")
    assert [r.getMessage() for r in caplog.records] == [
        "rule boom failed on message None; on_rule_error: drop"]


def test_on_rule_error_must_be_pass_or_drop() -> None:
    """on_rule_error accepts only pass or drop, with a did-you-mean."""
    assert errors("  - {type: normalize_traits}\n", top="on_rule_error: drp\n") == [
        "t.yaml:2: on_rule_error: must be one of pass, drop; got 'drp' (did you mean 'drop'?)"]


B2B_RULES = {
    "grouped": "  - type: one_group_per_user\n",
    "internal": "  - type: drop_internal_users\n    email_domains: [acme.io]\n",
}


def test_warns_when_internal_runs_before_grouping() -> None:
    """drop_internal_users before one_group_per_user loads with one file:line warning."""
    cfg = load("  - {type: normalize_traits}\n" + B2B_RULES["internal"] + B2B_RULES["grouped"])
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(
        "t.yaml:4: rules[1]: warning: drop_internal_users runs before one_group_per_user")


@pytest.mark.parametrize("rules", [
    pytest.param(B2B_RULES["grouped"] + B2B_RULES["internal"], id="right-order"),
    pytest.param(B2B_RULES["internal"], id="internal-alone"),
    pytest.param(B2B_RULES["grouped"], id="grouped-alone"),
])
def test_no_warning_in_right_order(rules: str) -> None:
    """one_group_per_user first, or either rule alone, loads without warnings."""
    assert load(rules).warnings == ()
