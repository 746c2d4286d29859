"""The YAML config as frozen dataclasses; every error collected as `file:line: path: message`."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from relay.config import ruleset
from relay.delivery.vendor_batch import BATCH_PATHS
from relay.http import client_address, cors
from relay.options import fields, yaml_source
from relay.options.fields import FieldError
from relay.pipeline.runner import Step

DEFAULT_PATH = "config/relay.yaml"
MAX_BATCH_MESSAGES = 2500
MAX_BATCH_BYTES = 500_000

Kind = Literal["segment", "june", "rudderstack"]


class ConfigError(Exception):
    """The config could not be loaded; `errors` holds one `file:line: path: message` each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _check(test: Callable[[Any], bool], message: str) -> dict[str, Any]:
    """Field metadata: `message` is the error when `test(value)` is false."""
    return {"check": lambda value: None if test(value) else message}


def _default(value: Any, test: Callable[[Any], bool], message: str, secret: bool = False) -> Any:
    metadata = {**_check(test, message), "secret": secret}
    return dataclasses.field(default=value, metadata=metadata, repr=not secret)


def _positive(value: float) -> Any:
    return _default(value, lambda v: v > 0, "must be greater than 0")


def _listen_ok(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


class _Listening:
    """The host and the port of a `listen` of `host:port` (an IPv6 host without brackets)."""

    listen: str

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _public_host_ok(value: str) -> bool:
    return re.fullmatch(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?(?:/[\w.~/-]*)?",
                        value) is not None


def _url_ok(value: str) -> bool:
    url = urlsplit(value)
    return url.scheme in ("http", "https") and bool(url.hostname)


def _key_ok(value: str) -> bool:
    return bool(value.strip()) and value == value.strip()


def _keys_wrong(keys: tuple[str, ...]) -> str | None:
    """The config check of `write_keys`: an empty key would let in requests that carry none."""
    for i, key in enumerate(keys):
        if not key.strip():
            return (f"entry {i} is empty, which would let in requests with no key (if it names"
                    " a variable, set it, or remove the entry to accept any key)")
        if not _key_ok(key):
            return f"entry {i} has a space at one end, which no SDK sends"
    return None


@dataclass(frozen=True)
class Storage:
    """Where the outbox and user state live."""

    path: str = _default("data/relay.db", bool, "must name a file")
    synchronous: Literal["full", "normal"] = "full"
    cache_size: int = _default(100_000, lambda v: v >= 1, "must be at least 1")
    max_bytes: int = _default(0, lambda v: v == 0 or v >= 1_000_000,
                              "must be 0 (no cap) or at least 1000000")
    when_full: Literal["reject", "drop_oldest"] = "reject"


def _redis_url_ok(value: str) -> bool:
    url = urlsplit(value)
    return url.scheme in ("redis", "rediss") and bool(url.hostname)


@dataclass(frozen=True)
class UserState:
    """Where the rules' user state lives: this relay's SQLite file, or a Redis that several
    relays (and workers) share."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    url: str = _default("", lambda v: v == "" or _redis_url_ok(v),
                        "must be empty or redis://[user:password@]host:port/db (rediss:// for"
                        " TLS)", secret=True)
    key_prefix: str = _default("relay:", lambda v: 0 < len(v) <= 64 and v.isprintable()
                               and " " not in v, "must be 1 to 64 printable characters, no space")
    ttl_days: float = _positive(90.0)
    timeout_ms: int = _default(50, lambda v: 1 <= v <= 10_000, "must be from 1 to 10000")
    on_unavailable: Literal["decide", "hold"] = "decide"
    # How long what was fetched about a user is used before it is asked again: the most a relay
    # may lag behind a change another relay made.
    cache_ms: int = _default(1000, lambda v: 0 <= v <= 600_000, "must be from 0 to 600000")

    def __post_init__(self) -> None:
        if self.backend == "redis" and not self.url:
            raise FieldError("url", "must be set when backend is redis, like"
                                    " redis://redis:6379/0")


@dataclass(frozen=True)
class Admin(_Listening):
    """The operators' HTTP endpoints: /admin/* off while `token` is empty; /readyz, /metrics and
    /admin/* on their own address when `listen` is set."""

    token: str = _default("", lambda v: v == "" or (len(v) >= 16 and _key_ok(v)),
                          "must be empty (admin endpoints off) or at least 16 characters,"
                          " with no space at either end", secret=True)
    # Where /readyz, /metrics and /admin/* are served instead of `listen` (which then keeps only
    # the event routes and /healthz): an address the internet does not reach.
    listen: str = _default("", lambda v: v == "" or _listen_ok(v),
                           "must be empty (served at the top-level listen) or host:port, like"
                           " 127.0.0.1:9090")


@dataclass(frozen=True)
class Limits:
    """Bounds on inbound connections, so that slow or too many clients cannot starve the rest."""

    max_connections: int = _default(1000, lambda v: v >= 1, "must be at least 1")
    header_seconds: float = _positive(20.0)
    body_seconds: float = _positive(30.0)


@dataclass(frozen=True)
class Cors:
    """Which pages (origins) may send events from a browser, and how long a preflight holds."""

    allow_origins: tuple[str, ...] = dataclasses.field(
        default=("*",), metadata={"check": cors.invalid})
    max_age_seconds: int = _default(86400, lambda v: v >= 0, "must be 0 or more")


@dataclass(frozen=True)
class Upstream:
    """One vendor that receives every accepted message, through its own queue."""

    name: str = dataclasses.field(metadata=_check(
        lambda v: re.fullmatch(r"[A-Za-z0-9_.-]+", v) is not None,
        "must be letters, digits, '.', '_' or '-'"))
    kind: Kind
    url: str = dataclasses.field(metadata=_check(
        _url_ok, "must be an http:// or https:// URL, like https://api.segment.io"))
    write_key: str = _default("", lambda v: v == "" or _key_ok(v),
                              "must be empty (forward the SDK's key) or a key with no space at"
                              " either end", secret=True)
    timeout_seconds: float = _positive(10.0)
    # 500, not the vendors' 2,500: measured, a backlog drains about twice as fast (bench/).
    max_batch_messages: int = _default(
        500, lambda v: 1 <= v <= MAX_BATCH_MESSAGES,
        f"must be from 1 to {MAX_BATCH_MESSAGES}")
    max_batch_bytes: int = _default(
        MAX_BATCH_BYTES, lambda v: 1024 <= v <= MAX_BATCH_BYTES,
        f"must be from 1024 to {MAX_BATCH_BYTES}")
    backoff_initial_seconds: float = _positive(0.5)
    backoff_max_seconds: float = _positive(60.0)
    pause_seconds: float = _positive(60.0)
    cdn_url: str = _default("", lambda v: v == "" or _url_ok(v),
                            "must be empty or an http:// or https:// URL, like "
                            "https://cdn.segment.com")
    cdn_cache_seconds: float = _positive(300.0)

    def __post_init__(self) -> None:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise FieldError("backoff_max_seconds", "must be at least backoff_initial_seconds")
        path = urlsplit(self.url).path.rstrip("/") if self.kind in BATCH_PATHS else ""
        if path.endswith(BATCH_PATHS.get(self.kind, "\0")):
            raise FieldError("url", f"ends with {BATCH_PATHS[self.kind]}, which relay adds: give"
                                    f" the vendor's base URL, like"
                                    f" {self.url.rstrip('/')[:-len(path)]}")


@dataclass(frozen=True)
class Config(_Listening):
    """Everything `relay serve` runs with."""

    upstreams: tuple[Upstream, ...] = dataclasses.field(
        metadata=_check(bool, "must name at least one upstream"))
    listen: str = _default("0.0.0.0:8080", _listen_ok, "must be host:port, like 0.0.0.0:8080")
    storage: Storage = Storage()
    state: UserState = UserState()
    workers: int = _default(1, lambda v: 1 <= v <= 64, "must be from 1 to 64")
    write_keys: tuple[str, ...] = dataclasses.field(default=(), metadata={"check": _keys_wrong})
    shutdown_grace_seconds: float = _default(5.0, lambda v: v >= 0, "must be 0 or more")
    on_rule_error: Literal["pass", "drop"] = "pass"
    admin: Admin = Admin()
    cors: Cors = Cors()
    trusted_proxies: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"check": client_address.invalid})
    public_host: str = _default("", lambda v: v == "" or _public_host_ok(v),
                                "must be empty or host[:port][/path], like www.example.com/t")
    limits: Limits = Limits()
    rules: tuple[Step, ...] = dataclasses.field(default=(), metadata={"yaml": False})
    file: str = dataclasses.field(default="", metadata={"yaml": False})
    worker: int = dataclasses.field(default=1, metadata={"yaml": False})  # this process's
    warnings: tuple[str, ...] = dataclasses.field(default=(), metadata={"yaml": False})

    @property
    def database(self) -> str:
        """This process's SQLite file: `storage.path`, or with workers the worker's own
        (`relay.ops.worker_files`)."""
        if self.worker == 1:
            return self.storage.path
        base = Path(self.storage.path)
        return str(base.with_name(f"{base.stem}.w{self.worker}{base.suffix}"))

    def __post_init__(self) -> None:
        if self.workers > 1 and self.state.backend != "redis":
            raise FieldError("workers", "more than 1 needs state.backend: redis (each worker has"
                                        " its own outbox, and only a shared store gives them one"
                                        " memory of users)")
        if self.admin.listen and self.admin.listen == self.listen:
            raise FieldError("admin", "listen is the top-level listen; give another port, or"
                                      " leave it empty to serve both there")


EXIT_INVALID = 2  # what a command exits with when its config does not load
MAX_FILE_BYTES = 1024 * 1024  # the shipped config, every option commented, is ~10 KB


def load_or_print(path: str) -> Config | None:
    """The config at `path`, or None once its errors are printed to stderr (for commands)."""
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """The config at `path`, or ConfigError listing every problem found."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}:1: (file): cannot read: {exc.strerror or exc}"]) from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([f"{path}:1: (file): over {MAX_FILE_BYTES} bytes; is it the config?"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError([f"{path}:{line}: (file): not UTF-8 text: byte 0x{data[exc.start]:02x}"
                           f" at byte {column} of the line; save the file as UTF-8"]) from None
    return parse(path, text, env)


def parse(file: str, text: str, env: Mapping[str, str] | None = None) -> Config:
    """The config in `text` (named `file` in errors), or ConfigError."""
    source = yaml_source.load(file, text, os.environ if env is None else env)
    if source.data is None:
        raise ConfigError(source.messages())
    data: Any = source.data if isinstance(source.data, dict) else {}
    if source.data is not None and not isinstance(source.data, dict):
        source.error((), "the config must be a mapping of keys")
    config = fields.build(Config, data, (), source, skip=("rules",))
    _check_upstream_names(config, source)
    steps = ruleset.build(data.get("rules", []), source)
    if source.errors:
        raise ConfigError(source.messages())
    notes = ruleset.warnings(steps, source) + _url_notes(config, source)
    return dataclasses.replace(config, rules=steps, file=file, warnings=notes)


def _url_notes(config: Config, source: yaml_source.Source) -> tuple[str, ...]:
    """Upstream URLs with a path: relay adds the batch path to it, which is seldom meant."""
    notes = []
    for i, upstream in enumerate(config.upstreams or ()):
        path = urlsplit(upstream.url).path.rstrip("/")
        if path:
            where = ("upstreams", i, "url")
            notes.append(f"{source.file}:{source.line(where)}: upstreams[{i}].url: warning: it"
                         f" has a path ({path}); batches go to {path}{BATCH_PATHS[upstream.kind]}."
                         " Most vendors take the base URL alone")
    return tuple(notes)


def _check_upstream_names(config: Config, source: yaml_source.Source) -> None:
    seen: set[str] = set()
    for i, upstream in enumerate(config.upstreams or ()):
        if upstream.name is not None and upstream.name in seen:
            source.error(("upstreams", i, "name"), f"another upstream is named {upstream.name!r}")
        seen.add(upstream.name)
