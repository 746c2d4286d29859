"""Shared fixtures: a fake vendor, config files, and relay running in-process on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes import FakeUpstream, free_port
from processes import RelayProcess

from relay import app, server
from relay.config import model as config

# Requests captured from the real SDKs (method, path, headers, body), one JSON object a line.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wire"

WriteConfig = Callable[..., Path]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A running fake vendor on a free loopback port."""
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Writes a relay YAML file under tmp_path from keyword overrides; returns its path."""

    def write(upstreams: list[dict[str, Any]], **overrides: Any) -> Path:
        data: dict[str, Any] = {
            "listen": "127.0.0.1:8080",  # TestServer picks its own port
            "storage": {"path": str(tmp_path / "relay.db"), "synchronous": "normal"},
            "shutdown_grace_seconds": 1,
            "upstreams": [
                {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2,
                 "pause_seconds": 0.3, "timeout_seconds": 2, **u}
                for u in upstreams
            ],
        }
        data.update(overrides)
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


SpawnRelay = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
async def spawn_relay(write_config: WriteConfig, tmp_path: Path) -> AsyncIterator[SpawnRelay]:
    """Starts `relay serve` as a real process on a free port with the given upstreams and
    top-level config; each is ready when returned, and killed by its pid at teardown."""
    started: list[RelayProcess] = []

    async def start(upstreams: list[dict[str, Any]], **overrides: Any) -> RelayProcess:
        port = free_port()
        path = write_config(upstreams, listen=f"127.0.0.1:{port}", **overrides)
        process = RelayProcess(path, port, tmp_path / f"relay-{len(started)}.log")
        started.append(process)
        process.spawn()
        await process.wait_ready()
        return process

    yield start
    for process in started:
        process.ensure_dead()


class RunningRelay:
    """relay served on 127.0.0.1 by the same Listener as `relay serve`, on a free port."""

    def __init__(self, cfg: config.Config) -> None:
        self.config = cfg
        self.application = app.build(cfg)
        self.listener = server.Listener(self.application, cfg)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.port}"

    @property
    def relay(self) -> app.Relay:
        return self.application[app.RELAY]

    async def __aenter__(self) -> RunningRelay:
        try:
            await self.listener.start(port=0, admin_port=0)  # free ones
        except BaseException:
            await self.listener.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.close()


@pytest.fixture
def start_relay() -> Callable[[Path], RunningRelay]:
    """Builds a RunningRelay from a config file; use it as `async with start_relay(path) as r`."""
    return lambda path: RunningRelay(config.load(str(path)))
