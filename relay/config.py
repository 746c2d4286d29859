"""The YAML config as frozen dataclasses; every error collected as `file:line: path: message`."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from relay import ruleset, schema, yamlsource
from relay.pipeline import Step
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
    cache_size: int = 100_000

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise FieldError("cache_size", "must be at least 1")


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
    on_rule_error: Literal["pass", "drop"] = "pass"
    rules: tuple[Step, ...] = dataclasses.field(default=(), metadata={"yaml": False})
    file: str = dataclasses.field(default="", metadata={"yaml": False})
    warnings: tuple[str, ...] = dataclasses.field(default=(), metadata={"yaml": False})

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
    steps = ruleset.build(data.get("rules", []), source)
    if source.errors:
        raise ConfigError(source.messages())
    notes = ruleset.warnings(steps, source)
    return dataclasses.replace(config, rules=steps, file=file, warnings=notes)


def _check_upstream_names(config: Config, source: yamlsource.Source) -> None:
    seen: set[str] = set()
    for i, upstream in enumerate(config.upstreams or ()):
        if upstream.name is not None and upstream.name in seen:
            source.error(("upstreams", i, "name"), f"another upstream is named {upstream.name!r}")
        seen.add(upstream.name)
