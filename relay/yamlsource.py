"""YAML documents loaded with the line of every value, duplicate keys caught, `${VAR}` expanded."""

from __future__ import annotations

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

    def line(self, path: Path) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Path, message: str) -> None:
        line = self.line(path)
        self.errors.append((line, f"{self.file}:{line}: {dotted(path)}: {message}"))

    def messages(self) -> list[str]:
        """Every error as `file:line: path: message`, in line order."""
        return [text for _, text in sorted(self.errors, key=lambda e: e[0])]


def dotted(path: Path) -> str:
    """`("upstreams", 0, "kind")` as `upstreams[0].kind`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top)"


def load(file: str, text: str, env: Mapping[str, str] | None = None) -> Source:
    """Parse `text`; syntax errors, duplicate keys and unset variables land in `errors`."""
    source = Source(file=file, data=None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        source.errors.append((line, f"{file}:{line}: (yaml): {problem}"))
        return source
    builder = _Builder(source, os.environ if env is None else env)
    source.data = {} if node is None else builder.value(node, ())
    return source


class _Builder:
    def __init__(self, source: Source, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env

    def value(self, node: yaml.Node, path: Path) -> Any:
        self.source.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

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
        constructor = yaml.SafeLoader(stream="")
        raw = constructor.construct_object(node)
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
