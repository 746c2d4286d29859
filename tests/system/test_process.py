"""relay as a real separate process: kill -9 and SIGTERM under load, exit codes, `relay check`."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from fakes import FakeUpstream, free_port
from processes import AUTH, Load, RelayProcess, acks_grow, clean_env, wait_delivered

REPO = Path(__file__).resolve().parents[2]
GRACE = 1.0  # shutdown_grace_seconds as the write_config fixture writes it
ServeConfig = Callable[[], tuple[Path, int]]
KEPT = re.compile(r"stopped: (\d+) message\(s\) for seg kept for the next start")


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
    """`python -m relay check --config config/relay.yaml` from the repo root accepts the file,
    with nothing to say once the staff domain is set (unset, it warns: tests/cli)."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check", "--config", "config/relay.yaml"],
        capture_output=True, text=True, timeout=20, cwd=str(REPO), check=False,
        env={**clean_env(), "RELAY_STAFF_DOMAIN": "acme.io"},
    )
    shipped = yaml.safe_load((REPO / "config" / "relay.yaml").read_text())
    counts = f"{len(shipped['upstreams'])} upstream(s), {len(shipped['rules'] or [])} rule(s)"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"config/relay.yaml: ok ({counts})\n"
    assert result.stderr == ""


def serve_once(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`relay serve` expected to end at once: its exit status and output."""
    return subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=20, env=clean_env(),
                          cwd=str(cwd), check=False)


async def test_a_second_relay_on_the_same_database_exits_at_once_naming_the_first(
        upstream, serve_config, relay_process, tmp_path, http):
    """A second `relay serve` on the storage.path a running relay holds (another port) exits 1
    at once, naming the first one's pid, and never listens; the first goes on serving and
    delivers alone."""
    path, port = serve_config()
    first = relay_process(path, port)
    first.spawn()
    await first.wait_ready()
    second_port = free_port()
    other = tmp_path / "second.yaml"
    other.write_text(path.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{second_port}"))
    started = time.monotonic()
    result = serve_once(other, tmp_path)
    assert result.returncode == 1, result
    assert time.monotonic() - started < 10
    assert f"is in use by another relay (pid {first.proc.pid})" in result.stderr
    assert "listening on" not in result.stderr
    assert port_is_free(second_port)
    async with http.post(first.url + "/v1/track", json={"userId": "u", "event": "E",
                                                        "messageId": "after"},
                         headers=AUTH) as resp:
        assert resp.status == 200
    assert [m["messageId"] for m in await upstream.wait_for(1)] == ["after"]


def test_a_port_in_use_ends_relay_before_it_opens_storage(tmp_path):
    """With its port taken, `relay serve` exits 1 saying it cannot listen, before it created
    its database or started anything that delivers, and without claiming to listen."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "never.db"
        path = tmp_path / "relay.yaml"
        path.write_text(f'listen: "127.0.0.1:{port}"\nstorage: {{path: "{db}"}}\nupstreams:\n'
                        "  - {name: seg, kind: segment, url: 'http://127.0.0.1:9'}\n")
        result = serve_once(path, tmp_path)
    assert result.returncode == 1, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listening on" not in result.stderr
    assert not db.exists()
