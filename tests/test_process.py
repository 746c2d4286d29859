"""relay as a real separate process: kill -9 and SIGTERM under load, exit codes, `relay check`."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fakes import FakeUpstream, free_port

REPO = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": "Basic " + base64.b64encode(b"WK:").decode()}
READY_SECONDS = 10.0
GRACE = 1.0  # shutdown_grace_seconds as the write_config fixture writes it
ServeConfig = Callable[[], tuple[Path, int]]
KEPT = re.compile(r"stopped: (\d+) message\(s\) for seg kept for the next start")


def clean_env() -> dict[str, str]:
    """The test's environment without anything that would change which config relay reads."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "SEGMENT_"))}
    env["RELAY_LOG_LEVEL"] = "INFO"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RelayProcess:
    """One `python -m relay serve` child; its stdout and stderr go to `log` (appended)."""

    def __init__(self, config_path: Path, port: int, log: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Starts a new child (the previous one must have exited)."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=clean_env(), cwd=str(self.log.parent),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def output_of_last_start(self) -> str:
        return self.output().rsplit(f"===== start {self.starts} =====", 1)[-1]

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill_and_wait(self) -> int:
        """SIGKILL, then the exit status once it is gone."""
        assert self.proc is not None
        self.proc.kill()
        return self.proc.wait(timeout=10)

    def ensure_dead(self) -> None:
        """Teardown: whatever state the child is in, it is gone afterwards."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    async def wait_ready(self, seconds: float = READY_SECONDS) -> None:
        """Polls GET /readyz until it answers 200; fails with the log if it never does."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"relay exited {self.proc.returncode} while starting:\n"
                                f"{self.output()}")
                try:
                    async with http.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        pytest.fail(f"relay not ready within {seconds}s:\n{self.output()}")

    async def wait_exit(self, seconds: float) -> int | None:
        """The exit status, or None if still running after `seconds`."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while (code := self.proc.poll()) is None:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.02)
        return code


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[[Path, int], RelayProcess]]:
    """Makes RelayProcess objects; every child still running is killed at teardown."""
    made: list[RelayProcess] = []

    def make(config_path: Path, port: int) -> RelayProcess:
        process = RelayProcess(config_path, port, tmp_path / f"relay-{len(made)}.log")
        made.append(process)
        return process

    yield make
    for process in made:
        process.ensure_dead()


class Load:
    """Concurrent SDK-like senders: batches and single calls, each message with a unique id.

    `acked` holds every messageId of a request answered 200; `statuses` counts every other
    HTTP answer; connection errors (the relay is down or going) are only counted.
    """

    def __init__(self, url: str, senders: int = 6, tag: str = "m") -> None:
        self.url = url
        self.senders = senders
        self.tag = tag
        self.acked: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self.connection_errors = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        self._tasks = [asyncio.create_task(self._send(n)) for n in range(self.senders)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=10.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for task in done:
                task.result()  # a sender's own bug must not pass silently
            self._tasks = []
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _send(self, sender: int) -> None:
        assert self._http is not None
        for seq in itertools.count():
            if self._stop.is_set():
                return
            base = f"{self.tag}-{sender}-{seq}"
            if seq % 3 == 2:
                ids = [base]
                path, body = "/v1/track", track(base, sender)
            else:
                ids = [f"{base}-{i}" for i in range(1 + (seq % 8))]
                path, body = "/v1/batch", {"batch": [{"type": "track", **track(m, sender)}
                                                    for m in ids]}
            try:
                async with self._http.post(self.url + path, json=body, headers=AUTH) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.connection_errors += 1
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                self.acked.update(ids)
            else:
                self.statuses[status] += 1


def track(message_id: str, sender: int) -> dict[str, Any]:
    """One track call's fields."""
    return {"messageId": message_id, "userId": f"user-{sender}", "event": "Load",
            "properties": {"n": message_id}}


async def wait_delivered(upstream: FakeUpstream, ids: set[str], seconds: float) -> set[str]:
    """Waits until every id in `ids` was accepted by the upstream; returns those still missing."""
    deadline = time.monotonic() + seconds
    missing = set(ids)
    seen = 0
    while True:
        accepted = upstream.accepted_ids()
        missing.difference_update(accepted[seen:])
        seen = len(accepted)
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(0.1)


async def acks_grow(load: Load, seconds: float) -> int:
    """Lets the load run `seconds`; returns how many messages were newly acked meanwhile."""
    before = len(load.acked)
    await asyncio.sleep(seconds)
    return len(load.acked) - before


@pytest.fixture
def serve_config(write_config: Callable[..., Path], upstream: FakeUpstream) -> ServeConfig:
    """A config file for one segment upstream (the fake) on a free port; returns (path, port)."""

    def make() -> tuple[Path, int]:
        port = free_port()
        path = write_config(
            [{"name": "seg", "kind": "segment", "url": upstream.url, "max_batch_messages": 40}],
            listen=f"127.0.0.1:{port}",
        )
        return path, port

    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for single requests made by a test itself."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        yield session


async def test_kill_9_under_load_loses_no_acked_message(upstream, serve_config, relay_process):
    """Five SIGKILLs under load (two with the upstream down) lose no message that was acked."""
    path, port = serve_config()
    relay = relay_process(path, port)
    relay.spawn()
    await relay.wait_ready()
    backlogs: list[int] = []
    async with Load(relay.url, tag="k9") as load:
        for cycle in range(5):
            upstream_down = cycle in (1, 3)
            if upstream_down:
                await upstream.stop()
            grew = await acks_grow(load, 0.6)
            assert grew > 0, f"cycle {cycle}: no message acked before the kill\n{relay.output()}"
            if upstream_down:
                backlog = len(load.acked - set(upstream.accepted_ids()))
                backlogs.append(backlog)
            assert relay.kill_and_wait() == -signal.SIGKILL
            await asyncio.sleep(0.1)  # senders meet a dead port meanwhile
            relay.spawn()
            await relay.wait_ready()
            if upstream_down:
                # The new run gets more traffic while the upstream is still down, then it is back.
                assert await acks_grow(load, 0.3) > 0
                await upstream.start()
        assert await acks_grow(load, 0.3) > 0
    assert len(backlogs) == 2
    assert all(b > 0 for b in backlogs), f"no backlog at a kill with the upstream down: {backlogs}"
    assert load.statuses == Counter(), f"answers other than 200: {load.statuses}"
    assert load.connection_errors > 0  # the kills did happen under load
    missing = await wait_delivered(upstream, load.acked, 20.0)
    assert not missing, (
        f"{len(missing)} of {len(load.acked)} acked messages never reached the upstream, e.g. "
        f"{sorted(missing)[:5]}\n{relay.output()[-4000:]}"
    )


async def slow_batch(ids: list[str], gate: asyncio.Event) -> AsyncIterator[bytes]:
    """A batch body sent in two parts: the second only once `gate` is set."""
    yield b'{"batch": ['
    await gate.wait()
    items = ",".join(
        f'{{"type": "track", "messageId": "{m}", "userId": "slow", "event": "Slow"}}'
        for m in ids
    )
    yield items.encode() + b"]}"


async def test_sigterm_under_load_exits_zero_and_loses_nothing(
        upstream, serve_config, relay_process):
    """SIGTERM under load: every request gets 200 or a connection error, exit 0 in time, no loss."""
    path, port = serve_config()
    relay = relay_process(path, port)
    relay.spawn()
    await relay.wait_ready()
    async with Load(relay.url, tag="term") as load:
        assert await acks_grow(load, 0.8) > 0
        sent_at = time.monotonic()
        relay.send(signal.SIGTERM)
        code = await relay.wait_exit(GRACE + 4.0)
        took = time.monotonic() - sent_at
    assert code == 0, f"exit {code} after {took:.1f}s\n{relay.output()}"
    assert load.statuses == Counter(), f"answers other than 200: {load.statuses}"
    relay.spawn()
    await relay.wait_ready()
    missing = await wait_delivered(upstream, load.acked, 15.0)
    assert not missing, (
        f"{len(missing)} of {len(load.acked)} acked messages never reached the upstream, e.g. "
        f"{sorted(missing)[:5]}\n{relay.output()[-4000:]}"
    )


async def test_sigterm_lets_a_request_in_flight_finish(upstream, serve_config, relay_process, http):
    """A request whose body is still arriving at SIGTERM is answered 200, then relay exits 0."""
    path, port = serve_config()
    relay = relay_process(path, port)
    relay.spawn()
    await relay.wait_ready()
    gate = asyncio.Event()
    slow_ids = [f"slow-{i}" for i in range(3)]

    async def slow_request() -> int:
        async with http.post(relay.url + "/v1/batch", data=slow_batch(slow_ids, gate),
                             headers={**AUTH, "Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status

    slow = asyncio.create_task(slow_request())
    try:
        await asyncio.sleep(0.3)  # its headers and first bytes are in; its handler is running
        assert not slow.done()
        sent_at = time.monotonic()
        relay.send(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert relay.proc is not None and relay.proc.poll() is None, (
            f"relay exited with a request still in flight\n{relay.output()}")
        gate.set()
        done, _ = await asyncio.wait([slow], timeout=GRACE + 2.0)
        assert done, (f"the in-flight request got no answer {GRACE + 2.0:.0f}s after its body"
                      f" was complete\n{relay.output()}")
        assert slow.result() == 200
        code = await relay.wait_exit(GRACE + 4.0)
        took = time.monotonic() - sent_at
        assert code == 0, f"exit {code} {took:.1f}s after SIGTERM\n{relay.output()}"
    finally:
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
    missing = await wait_delivered(upstream, set(slow_ids), 5.0)
    assert not missing


async def test_sigterm_with_upstream_down_keeps_messages_for_next_start(
        upstream, serve_config, relay_process):
    """SIGTERM with the upstream down logs how many messages are kept; the next start sends them."""
    path, port = serve_config()
    await upstream.stop()
    relay = relay_process(path, port)
    relay.spawn()
    await relay.wait_ready()
    async with Load(relay.url, tag="down") as load:
        assert await acks_grow(load, 0.6) > 0
        relay.send(signal.SIGTERM)
        code = await relay.wait_exit(GRACE + 4.0)
    assert code == 0, f"exit {code}\n{relay.output()}"
    assert load.statuses == Counter(), f"answers other than 200: {load.statuses}"
    assert upstream.requests == []
    kept = [int(n) for n in KEPT.findall(relay.output_of_last_start())]
    assert kept == [len(load.acked)], f"acked {len(load.acked)}\n{relay.output()}"

    await upstream.start()
    relay.spawn()
    await relay.wait_ready()
    missing = await wait_delivered(upstream, load.acked, 15.0)
    assert not missing, f"{len(missing)} of {len(load.acked)} kept messages never arrived"
    assert set(upstream.accepted_ids()) == load.acked


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_serve_with_invalid_config_exits_2_before_binding(tmp_path):
    """`relay serve` with a bad config exits 2 with `file:line: path: message` lines, unbound."""
    port = free_port()
    db = tmp_path / "never.db"
    path = tmp_path / "bad.yaml"
    path.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        "storage:\n"
        f'  path: "{db}"\n'
        "upstreams:\n"
        "  - name: seg\n"
        "    kind: segmnet\n"
        "    url: http://127.0.0.1:9\n"
        "    timeout_seconds: fast\n"
        "lisen: x\n"
    )
    assert port_is_free(port)
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=20, env=clean_env(), cwd=str(tmp_path),
        check=False,
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:6: upstreams[0].kind: must be one of segment, june, rudderstack;"
        " got 'segmnet' (did you mean 'segment'?)",
        f"{path}:8: upstreams[0].timeout_seconds: must be a number, got str 'fast'",
        f"{path}:9: lisen: unknown key (did you mean 'listen'?)",
    ]
    assert port_is_free(port)
    assert not db.exists()  # storage is opened only after the config was accepted


def test_check_shipped_config_exits_0():
    """`python -m relay check --config config/relay.yaml` from the repo root accepts the file."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check", "--config", "config/relay.yaml"],
        capture_output=True, text=True, timeout=20, env=clean_env(), cwd=str(REPO), check=False,
    )
    shipped = yaml.safe_load((REPO / "config" / "relay.yaml").read_text())
    counts = f"{len(shipped['upstreams'])} upstream(s), {len(shipped['rules'] or [])} rule(s)"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"config/relay.yaml: ok ({counts})\n"
    assert result.stderr == ""
