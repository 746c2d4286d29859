"""YAML documents loaded with the line of every value, duplicate keys caught, `${VAR}` expanded."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


@dataclass
class Source:
    """A loaded document: plain Python values, plus where each came from."""

    file: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)
    failed: set[Path] = field(default_factory=set)  # the paths errors were recorded at

    def line(self, path: Path) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Path, message: str) -> None:
        line = self.line(path)
        self.errors.append((line, f"{self.file}:{line}: {dotted(path)}: {message}"))
        self.failed.add(path)

    def failed_within(self, path: Path) -> bool:
        """Whether an error was recorded at `path` or inside it (an unset variable, say)."""
        return any(p[:len(path)] == path for p in self.failed)

    def messages(self) -> list[str]:
        """Every error as `file:line: path: message`, in line order."""
        return [text for _, text in sorted(self.errors, key=lambda e: e[0])]


_PLAIN = re.compile(r"[^\s\[\]\"]+")  # a key written as it is: nothing that would end the word


def dotted(path: Path) -> str:
    """`("upstreams", 0, "kind")` as `upstreams[0].kind`; a key with spaces, brackets, quotes or
    unprintable characters as `["a key"]`, so that an error's path stays readable on one line."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN.fullmatch(part) or not part.isprintable():
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else part
    return out or "(top)"


def load(file: str, text: str, env: Mapping[str, str] | None = None) -> Source:
    """Parse `text`; syntax errors, duplicate keys and unset variables land in `errors`."""
    source = Source(file=file, data=None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        builder = _Builder(source, os.environ if env is None else env)
        value = None if node is None else builder.value(node, ())
        source.data = {} if value is None else value  # an empty document, or `!` alone
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).split("\n  in ", 1)[0]
        problem = " ".join(problem.split())  # one line, whatever PyYAML made of it
        source.data = None
        source.errors.append((line, f"{file}:{line}: (yaml): {problem}"))
    except _Unbounded as exc:
        source.data = None
        source.errors.append((exc.line, f"{file}:{exc.line}: (yaml): {exc}"))
    except RecursionError:
        source.data = None
        source.errors.append((1, f"{file}:1: (yaml): nests too deeply"))
    return source


# Values a config may hold once its aliases are expanded: the shipped one holds ~150, and an
# "alias bomb" of a few hundred bytes would expand to billions.
MAX_VALUES = 20_000
_MERGE = "tag:yaml.org,2002:merge"


class _Unbounded(Exception):
    """The document cannot be turned into values: a recursive alias, or too many values."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _Builder:
    def __init__(self, source: Source, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.values = 0
        self.inside: set[int] = set()  # the collections being built, by id: a cycle meets one

    def value(self, node: yaml.Node, path: Path) -> Any:
        line = node.start_mark.line + 1
        self.source.lines[path] = line
        self.values += 1
        if self.values > MAX_VALUES:
            raise _Unbounded(line, f"over {MAX_VALUES} values once its aliases are expanded")
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return self.scalar(node, path)
        if id(node) in self.inside:
            raise _Unbounded(line, "an alias refers to a value that holds it (a recursive alias)")
        self.inside.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            return [self.value(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.inside.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(self.scalar(key_node, path))
            child = (*path, key)
            if key in out:
                first = self.source.lines[child]
                self.source.lines[child] = key_node.start_mark.line + 1
                self.source.error(child, f"duplicate key (first set on line {first})")
                continue
            self.source.lines[child] = key_node.start_mark.line + 1
            out[key] = self.value(value_node, child)
            self.source.lines[child] = key_node.start_mark.line + 1
        return out

    def scalar(self, node: yaml.Node, path: Path) -> Any:
        if node.tag == _MERGE:
            raise _Unbounded(node.start_mark.line + 1, "merge keys (<<) are not supported; write"
                             " the keys out, or give the shared value an anchor and use it whole")
        constructor = yaml.SafeLoader(stream="")
        try:
            raw = constructor.construct_object(node)
        except yaml.YAMLError:
            raise  # an unknown tag: reported with its line like any YAML error
        except Exception as exc:  # `!!int abc`, `!!bool maybe`: a tag its text does not fit
            problem = " ".join(str(exc).split())
            self.source.error(path, f"cannot read {node.tag.rpartition(':')[2]} value: {problem}")
            return None
        if not isinstance(raw, str) or "${" not in raw:
            return raw
        expanded = _ENV.sub(lambda m: self.variable(m, path), raw)
        if getattr(node, "style", None) is None:
            # An unquoted `${PORT}` should become the int it names, as if written literally;
            # anything that is not a plain scalar in YAML stays the string it is.
            try:
                value = yaml.safe_load(expanded) if expanded.strip() else ""
            except yaml.YAMLError:
                return expanded
            return expanded if isinstance(value, (dict, list)) else value
        return expanded

    def variable(self, match: re.Match[str], path: Path) -> str:
        name, has_default, default = match.group(1), match.group(2), match.group(3)
        value = self.env.get(name)
        if value:
            return value
        if has_default is not None:
            return default or ""
        if value is None:
            self.source.error(
                path, f"environment variable {name} is not set (write ${{{name}:-}} to allow empty)"
            )
        return ""
