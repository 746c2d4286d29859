"""The YAML config as frozen dataclasses; every error collected as `file:line: path: message`."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from relay import schema, yamlsource
from relay.pipeline import Rule, Step
from relay.rules import REGISTRY
from relay.schema import FieldError

DEFAULT_PATH = "config/relay.yaml"
MAX_BATCH_MESSAGES = 2500
MAX_BATCH_BYTES = 500_000

Kind = Literal["segment", "june", "rudderstack"]


class ConfigError(Exception):
    """The config could not be loaded; `errors` holds one `file:line: path: message` each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Storage:
    """Where the outbox and user state live."""

    path: str = "data/relay.db"
    synchronous: Literal["full", "normal"] = "full"


@dataclass(frozen=True)
class Upstream:
    """One vendor that receives every accepted message, through its own queue."""

    name: str
    kind: Kind
    url: str
    write_key: str = ""
    timeout_seconds: float = 10.0
    max_batch_messages: int = 500
    max_batch_bytes: int = MAX_BATCH_BYTES
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 60.0
    pause_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise FieldError("name", "must be letters, digits, '.', '_' or '-'")
        url = urlsplit(self.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise FieldError("url", f"must be an http:// or https:// URL; got {self.url!r}")
        if not 1 <= self.max_batch_messages <= MAX_BATCH_MESSAGES:
            raise FieldError("max_batch_messages", f"must be from 1 to {MAX_BATCH_MESSAGES}")
        if not 1024 <= self.max_batch_bytes <= MAX_BATCH_BYTES:
            raise FieldError("max_batch_bytes", f"must be from 1024 to {MAX_BATCH_BYTES}")
        for name in ("timeout_seconds", "backoff_initial_seconds", "pause_seconds"):
            if getattr(self, name) <= 0:
                raise FieldError(name, "must be greater than 0")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise FieldError("backoff_max_seconds", "must be at least backoff_initial_seconds")


@dataclass(frozen=True)
class Config:
    """Everything `relay serve` runs with."""

    upstreams: tuple[Upstream, ...]
    listen: str = "0.0.0.0:8080"
    storage: Storage = Storage()
    write_keys: tuple[str, ...] = ()
    shutdown_grace_seconds: float = 5.0
    rules: tuple[Step, ...] = dataclasses.field(default=(), metadata={"yaml": False})
    file: str = dataclasses.field(default="", metadata={"yaml": False})

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FieldError("listen", f"must be host:port, like 0.0.0.0:8080; got {self.listen!r}")
        if not self.upstreams:
            raise FieldError("upstreams", "must name at least one upstream")
        if self.shutdown_grace_seconds < 0:
            raise FieldError("shutdown_grace_seconds", "must be 0 or more")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """The config at `path`, or ConfigError listing every problem found."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}:1: (file): cannot read: {exc.strerror or exc}"]) from exc
    return parse(path, text, env)


def parse(file: str, text: str, env: Mapping[str, str] | None = None) -> Config:
    """The config in `text` (named `file` in errors), or ConfigError."""
    source = yamlsource.load(file, text, os.environ if env is None else env)
    if source.data is None:
        raise ConfigError(source.messages())
    data: Any = source.data if isinstance(source.data, dict) else {}
    if source.data is not None and not isinstance(source.data, dict):
        source.error((), "the config must be a mapping of keys")
    config = schema.build(Config, data, (), source, skip=("rules",))
    _check_upstream_names(config, source)
    steps = _build_rules(data.get("rules", []), source)
    if source.errors:
        raise ConfigError(source.messages())
    return dataclasses.replace(config, rules=steps, file=file)


def _check_upstream_names(config: Config, source: yamlsource.Source) -> None:
    seen: set[str] = set()
    for i, upstream in enumerate(config.upstreams or ()):
        if upstream.name is not None and upstream.name in seen:
            source.error(("upstreams", i, "name"), f"another upstream is named {upstream.name!r}")
        seen.add(upstream.name)


def _build_rules(items: Any, source: yamlsource.Source) -> tuple[Step, ...]:
    if not isinstance(items, list):
        source.error(("rules",), "must be a list of rules")
        return ()
    steps: list[Step] = []
    ids: set[str] = set()
    for i, item in enumerate(items):
        path: yamlsource.Path = ("rules", i)
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(kind, str):
            source.error(path, "each rule needs a 'type': one of " + ", ".join(sorted(REGISTRY)))
            continue
        cls = REGISTRY.get(kind)
        if cls is None:
            hint = schema.suggest(kind, REGISTRY)
            source.error((*path, "type"), f"unknown rule type {kind!r}{hint}")
            continue
        rule_id = item.get("id", f"{kind}#{i}")
        if not isinstance(rule_id, str) or rule_id in ids:
            source.error((*path, "id"), f"must be a unique string; got {rule_id!r}")
        ids.add(str(rule_id))
        rule: Rule = schema.build(cls, item, path, source, skip=("type", "id"))
        steps.append(Step(id=str(rule_id), rule=rule))
    return tuple(steps)
