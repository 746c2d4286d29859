"""Builds frozen dataclasses from loaded YAML, collecting every error with its line."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from relay.options.yaml_source import Path, Source

T = TypeVar("T")

_MISSING = object()


class FieldError(ValueError):
    """Raised from a dataclass's `__post_init__` to blame one of its fields."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """` (did you mean 'x'?)` when a choice is close to `word`, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build(cls: type[T], value: Any, path: Path, source: Source, skip: tuple[str, ...] = ()) -> T:
    """`value` (a mapping) as a `cls`; on any error it is recorded and a best effort returned.

    Keys named in `skip` are accepted and left for the caller (a rule's `type`, say); fields
    with `metadata={"yaml": False}` are not read from YAML at all, `metadata={"key": "from"}`
    reads a field from a YAML key that is no Python name, and `metadata={"check": f}` runs
    `f(value)` on a well-typed value: a string it returns is that field's error (which quotes the
    value unless `metadata={"secret": True}`). Checks run per
    field, so one file reports them all at once; `__post_init__` is for checks across fields.
    """
    if not isinstance(value, dict):
        source.error(path, f"must be a mapping, got {_kind(value)}")
        value = {}
    hints = typing.get_type_hints(cls)
    fields = {
        f.metadata.get("key", f.name): f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.metadata.get("yaml", True)
    }
    kwargs: dict[str, Any] = {}
    errors_before = len(source.errors)
    for key in value:
        if key not in fields and key not in skip:
            source.error((*path, key), "unknown key" + suggest(key, fields))
    for key, spec in fields.items():
        if key in value:
            before = len(source.errors)
            kwargs[spec.name] = convert(hints[spec.name], value[key], (*path, key), source)
            check = spec.metadata.get("check")
            problem = None
            if check and len(source.errors) == before and not source.failed_within((*path, key)):
                problem = check(kwargs[spec.name])
            if problem:
                shown = kwargs[spec.name]
                shows = isinstance(shown, (str, int, float)) and not spec.metadata.get("secret")
                got = f"; got {shown!r}" if shows else ""
                source.error((*path, key), problem + got)
        elif _default(spec) is _MISSING:
            source.error(path, f"missing required key '{key}'")
    if len(source.errors) > errors_before:
        return _placeholder(cls, kwargs)
    return _construct(cls, kwargs, path, source)


def convert(hint: Any, value: Any, path: Path, source: Source) -> Any:
    """`value` checked against the type `hint`; records an error and returns it unchanged if off."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, path, source)
    if origin is typing.Literal:
        if value not in args:
            shown = ", ".join(str(a) for a in args)
            hint_text = suggest(str(value), [str(a) for a in args])
            source.error(path, f"must be one of {shown}; got {value!r}{hint_text}")
        return value
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            source.error(path, f"must be a mapping, got {_kind(value)}")
            return {}
        return {str(k): convert(args[1], v, (*path, str(k)), source) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            source.error(path, f"must be a list, got {_kind(value)}")
            return ()
        return tuple(convert(args[0], item, (*path, i), source) for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return build(typing.cast(type[Any], hint), value, path, source)
    return _scalar(hint, value, path, source)


def _scalar(hint: Any, value: Any, path: Path, source: Source) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        source.error(path, f"must be {_NAMES.get(hint, hint.__name__)}, got {_kind(value)}")
    return value


def _construct(cls: type[T], kwargs: dict[str, Any], path: Path, source: Source) -> T:
    try:
        return cls(**kwargs)
    except FieldError as exc:
        source.error((*path, exc.field), str(exc))
    except (ValueError, TypeError) as exc:
        source.error(path, str(exc))
    return _placeholder(cls, kwargs)


def _placeholder(cls: type[T], kwargs: dict[str, Any]) -> T:
    """An unvalidated instance, so that loading can go on to find further errors."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        default = _default(f)
        value = kwargs.get(f.name, None if default is _MISSING else default)
        object.__setattr__(obj, f.name, value)
    return obj


def _default(spec: dataclasses.Field[Any]) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return _MISSING


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
