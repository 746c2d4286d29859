"""`when:` conditions: small declarative tests over a message, compiled once at load time.

    when:
      type: [track, page]               # the message type, one of
      event: "Debug *"                  # glob(s) on the event name
      properties.plan: pro              # a dotted path equals a value
      context.groupId: {exists: false}  # operators: equals, in, exists, matches (regex)
      not: {event: "Debug keep"}        # negation; `any: [...]` is any-of
    when: [{type: track}, {event: "A*"}]  # a list: all of them
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.options.fields import suggest
from relay.options.yaml_source import Path, Source
from relay.pipeline import Message, dotted

_ABSENT = object()
OPERATORS = ("equals", "in", "exists", "matches")
EVENTS_REMEMBERED = 4096  # event names an `event:` glob remembers its verdict for


@dataclass(frozen=True)
class Condition:
    """A compiled `when:`; `test` is the whole predicate, `text` what the YAML said."""

    test: Callable[[Message], bool]
    text: str

    def matches(self, message: Message) -> bool:
        return self.test(message)


def compile_when(value: Any, path: Path, source: Source) -> Condition | None:
    """`value` as a Condition; errors are recorded in `source` and None returned."""
    before = len(source.errors)
    test = _compile(value, path, source)
    if len(source.errors) > before:
        return None
    return Condition(test, _short(value))


def _compile(value: Any, path: Path, source: Source) -> Callable[[Message], bool]:
    if isinstance(value, list):
        if not value:
            source.error(path, "must be a non-empty list of conditions")
            return _never
        return _all([_compile(item, (*path, i), source) for i, item in enumerate(value)])
    if not isinstance(value, dict) or not value:
        source.error(path, "a condition is a mapping (like {type: track}) or a list of them")
        return _never
    return _all([_clause(key, item, (*path, key), source) for key, item in value.items()])


def _clause(key: str, value: Any, path: Path, source: Source) -> Callable[[Message], bool]:
    if key == "not":
        inner = _compile(value, path, source)
        return lambda m: not inner(m)
    if key == "any":
        if not isinstance(value, list) or not value:
            source.error(path, "must be a non-empty list of conditions")
            return _never
        parts = [_compile(item, (*path, i), source) for i, item in enumerate(value)]
        return lambda m: any(p(m) for p in parts)
    if key == "type":
        return _in_strings("type", value, path, source)
    if key == "event":
        return _event_glob(value, path, source)
    if not key or "" in dotted.split(key):
        source.error(path, "expected type, event, not, any, or a dotted path like properties.x")
        return _never
    if isinstance(value, dict):
        return _operators(dotted.split(key), value, path, source)
    return _equals(dotted.split(key), value)


def _operators(parts: tuple[str, ...], ops: dict[str, Any], path: Path,
               source: Source) -> Callable[[Message], bool]:
    if not ops:
        source.error(path, f"needs an operator: {', '.join(OPERATORS)}")
        return _never
    tests = []
    for op, operand in ops.items():
        where = (*path, op)
        if op == "equals":
            tests.append(_equals(parts, operand))
        elif op == "in":
            if not isinstance(operand, list):
                source.error(where, "must be a list of values")
                continue
            tests.append(_member(parts, operand))
        elif op == "exists":
            if not isinstance(operand, bool):
                source.error(where, "must be true or false")
                continue
            tests.append(_exists(parts, operand))
        elif op == "matches":
            tests.append(_regex(parts, operand, where, source))
        else:
            source.error(where, f"unknown operator; use one of {', '.join(OPERATORS)}"
                         + suggest(op, OPERATORS))
    return _all(tests)


def _equals(parts: tuple[str, ...], operand: Any) -> Callable[[Message], bool]:
    return lambda m: _same(dotted.get(m, parts, _ABSENT), operand)


def _member(parts: tuple[str, ...], operand: list[Any]) -> Callable[[Message], bool]:
    return lambda m: any(_same(dotted.get(m, parts, _ABSENT), o) for o in operand)


def _exists(parts: tuple[str, ...], wanted: bool) -> Callable[[Message], bool]:
    return lambda m: (dotted.get(m, parts, None) is not None) is wanted


def _regex(parts: tuple[str, ...], operand: Any, path: Path,
           source: Source) -> Callable[[Message], bool]:
    try:
        pattern = re.compile(operand) if isinstance(operand, str) else None
    except re.error as exc:
        source.error(path, f"not a valid regular expression: {exc}")
        return _never
    if pattern is None:
        source.error(path, "must be a regular expression (a string)")
        return _never

    def test(m: Message) -> bool:
        value = dotted.get(m, parts)
        return isinstance(value, str) and pattern.search(value) is not None

    return test


def _in_strings(key: str, value: Any, path: Path,
                source: Source) -> Callable[[Message], bool]:
    options = [value] if isinstance(value, str) else value
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        source.error(path, "must be a string or a list of strings")
        return _never
    wanted = frozenset(options)

    def test(m: Message) -> bool:
        found = m.get(key)
        return isinstance(found, str) and found in wanted

    return test


def _event_glob(value: Any, path: Path, source: Source) -> Callable[[Message], bool]:
    globs = [value] if isinstance(value, str) else value
    if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
        source.error(path, "must be a glob like 'Debug *' or a list of them")
        return _never
    pattern = re.compile("|".join(fnmatch.translate(g) for g in globs))
    # An app sends a small set of event names over and over: each is matched once, then looked
    # up (a third of the cost); the memory is bounded by starting over when it fills.
    seen: dict[str, bool] = {}

    def test(m: Message) -> bool:
        event = m.get("event")
        if event.__class__ is not str:
            return isinstance(event, str) and pattern.match(event) is not None
        found = seen.get(event)
        if found is None:
            if len(seen) >= EVENTS_REMEMBERED:
                seen.clear()
            found = seen[event] = pattern.match(event) is not None
        return found

    return test


def _same(value: Any, operand: Any) -> bool:
    # YAML `1` must not equal JSON `true`, nor `1` equal `"1"`.
    return value is not _ABSENT and dotted.same(value, operand)


def _all(tests: list[Callable[[Message], bool]]) -> Callable[[Message], bool]:
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:  # the usual `{type: ..., event: ...}`, without a loop
        first, second = tests
        return lambda m: first(m) and second(m)
    chain = tuple(tests)

    def test(m: Message) -> bool:
        for each in chain:  # noqa: SIM110 - a generator costs more, and this runs per message
            if not each(m):
                return False
        return True

    return test


def _never(message: Message) -> bool:
    return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
