"""Dotted paths (`context.app.name`) into JSON messages."""

from __future__ import annotations

from typing import Any

_ABSENT = object()


def split(path: str) -> tuple[str, ...]:
    """`"context.app.name"` as its parts; empty parts are a caller's error, caught in config."""
    return tuple(path.split("."))


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


def put(message: dict[str, Any], parts: tuple[str, ...], value: Any) -> None:
    """Sets `parts` to `value`, making (or replacing non-object) parents as objects."""
    node = message
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def delete(message: dict[str, Any], parts: tuple[str, ...]) -> bool:
    """Removes `parts` if present; True when something was removed."""
    parent = get(message, parts[:-1]) if len(parts) > 1 else message
    if isinstance(parent, dict) and parts[-1] in parent:
        del parent[parts[-1]]
        return True
    return False
