"""Dotted paths (`context.app.name`) into JSON messages.

Rules never change the message they are given: `replaced` and `removed` return a new message that
shares everything but the objects along the path. So "did this rule change anything?" is an
identity test, and a rule that fails half-way has changed nothing.
"""

from __future__ import annotations

from typing import Any

_ABSENT = object()


def split(path: str) -> tuple[str, ...]:
    """`"context.app.name"` as its parts; empty parts are a caller's error, caught in config."""
    return tuple(path.split("."))


def same(a: Any, b: Any) -> bool:
    """JSON equality that tells `true` from `1` and `1` from `"1"`, at every depth."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return a == b
    return type(a) is type(b) and bool(a == b)


def valid(path: Any) -> bool:
    """Whether `path` is a non-empty dotted path with no empty part."""
    return isinstance(path, str) and bool(path) and "" not in split(path)


def get(message: dict[str, Any], parts: tuple[str, ...], default: Any = None) -> Any:
    """The value at `parts`, or `default` when any step is missing or not an object."""
    node: Any = message
    for part in parts:
        if not isinstance(node, dict):
            return default
        node = node.get(part, _ABSENT)
        if node is _ABSENT:
            return default
    return node


def replaced(message: dict[str, Any], parts: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of `message` with `parts` set to `value` (non-object parents become objects)."""
    out = dict(message)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def removed(message: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `message` without `parts`; `message` itself when there is nothing to remove."""
    if get(message, parts, _ABSENT) is _ABSENT:
        return message
    out = dict(message)
    node = out
    for part in parts[:-1]:
        child = dict(node[part])
        node[part] = child
        node = child
    del node[parts[-1]]
    return out
