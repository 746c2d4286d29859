"""Injected faults, each against real parts: kill -9 twenty times under load, the writer process
killed under load, a vendor host whose name does not resolve, a vendor down far longer than the
backoff cap, and a torn or corrupt database file at start. Each test prints a `figures:` line
(pytest -s) for docs/reliability.md."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fakes import FakeUpstream, Reply, free_port
from processes import (
    AUTH,
    Load,
    RelayProcess,
    acks_grow,
    alive_as,
    clean_env,
    wait_delivered,
)
from prometheus_client.parser import text_string_to_metric_families

UNRESOLVABLE = "http://relay-test.invalid:9"  # .invalid never resolves (RFC 2606)
KILLS = 20


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    """RelayProcess objects to kill at teardown, whatever state they are in."""
    made: list[RelayProcess] = []
    yield made
    for process in made:
        process.ensure_dead()


def figures(**values: Any) -> None:
    """One line of figures for the reliability table."""
    print("figures:", json.dumps(values))


def duplicates(upstream: FakeUpstream) -> int:
    """Messages the upstream accepted more than once."""
    return sum(n - 1 for n in Counter(upstream.accepted_ids()).values())


async def test_kill_9_twenty_times_under_load_loses_no_acked_message(
        upstream, write_config, processes, tmp_path):
    """Twenty SIGKILLs in a row under six concurrent senders (the upstream down across every
    fourth), then every acked messageId reaches the upstream; duplicates are counted."""
    port = free_port()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url,
                          "max_batch_messages": 40}], listen=f"127.0.0.1:{port}")
    relay = RelayProcess(path, port, tmp_path / "relay.log")
    processes.append(relay)
    relay.spawn()
    await relay.wait_ready()
    started = time.monotonic()
    async with Load(relay.url, tag="k20") as load:
        for cycle in range(KILLS):
            down = cycle % 4 == 1
            if down:
                await upstream.stop()
            grew = await acks_grow(load, 0.4)
            assert grew > 0, f"cycle {cycle}: nothing acked before the kill\n{relay.output()}"
            assert relay.kill_and_wait() == -signal.SIGKILL
            await asyncio.sleep(0.05)
            relay.spawn()
            await relay.wait_ready()
            if down:
                await upstream.start()
        assert await acks_grow(load, 0.3) > 0
    assert load.statuses == Counter(), f"answers other than 200: {load.statuses}"
    missing = await wait_delivered(upstream, load.acked, 30.0)
    assert not missing, (f"{len(missing)} of {len(load.acked)} acked messages lost, e.g. "
                         f"{sorted(missing)[:5]}\n{relay.output()[-4000:]}")
    figures(test="kill_9_x20", kills=KILLS, seconds=round(time.monotonic() - started, 1),
            acked=len(load.acked), delivered=len(set(upstream.accepted_ids()) & load.acked),
            duplicates=duplicates(upstream), lost=len(missing),
            connection_errors=load.connection_errors)


async def started(upstream: FakeUpstream, write_config: Callable[..., Path],
                  processes: list[RelayProcess], tmp_path: Path) -> RelayProcess:
    """relay as a process with one upstream, ready."""
    port = free_port()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        listen=f"127.0.0.1:{port}")
    relay = RelayProcess(path, port, tmp_path / "relay.log")
    processes.append(relay)
    relay.spawn()
    await relay.wait_ready()
    return relay


async def test_writer_process_ends_with_relay_even_on_kill_9(
        upstream, write_config, processes, tmp_path):
    """relay's writer process (the one SQLite connection that writes) exits by itself within
    seconds of relay being killed with SIGKILL, so no orphan keeps the database open."""
    relay = await started(upstream, write_config, processes, tmp_path)
    writers = relay.writer_pids()
    assert len(writers) == 1, relay.output()
    assert relay.kill_and_wait() == -signal.SIGKILL
    for _ in range(200):  # ten seconds at most
        if not alive_as(writers[0], "relay.writer_child"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the writer process outlived relay by ten seconds")


async def test_killed_writer_process_is_replaced_and_loses_no_acked_message(
        upstream, write_config, processes, tmp_path):
    """Killing the writer process under load costs at most some 503 answers (never a 500, never
    relay itself): a new writer takes over, acks go on, and every acked message is delivered."""
    relay = await started(upstream, write_config, processes, tmp_path)
    async with Load(relay.url, tag="wk") as load:
        for _ in range(3):
            assert await acks_grow(load, 0.3) > 0
            (writer,) = relay.writer_pids()
            os.kill(writer, signal.SIGKILL)
            await asyncio.sleep(0.3)
            assert await acks_grow(load, 3.0) > 0, relay.output()[-3000:]
            assert relay.writer_pids() != [writer]
        assert relay.proc is not None and relay.proc.poll() is None
    assert set(load.statuses) <= {503}, f"answers other than 200 and 503: {load.statuses}"
    missing = await wait_delivered(upstream, load.acked, 30.0)
    assert not missing, f"{len(missing)} of {len(load.acked)} acked messages lost"
    assert "storage: writable again" in relay.output(), relay.output()[-3000:]


async def test_unresolvable_vendor_host_keeps_messages_until_the_url_is_fixed(
        upstream, write_config, processes, tmp_path):
    """With the upstream's host name unresolvable, messages are acked, kept and retried (the
    DNS error logged); a reload says the url takes a restart; after it, all arrive once."""
    port = free_port()
    settings: dict[str, Any] = {"name": "seg", "kind": "segment", "url": UNRESOLVABLE}
    path = write_config([settings], listen=f"127.0.0.1:{port}")
    relay = RelayProcess(path, port, tmp_path / "relay.log")
    processes.append(relay)
    relay.spawn()
    await relay.wait_ready()
    async with Load(relay.url, tag="dns") as load:
        assert await acks_grow(load, 1.0) > 0
    assert load.statuses == Counter()
    await until(lambda: "relay-test.invalid" in relay.output(), 5.0, relay)
    assert "batch of" in relay.output() and "messages kept" in relay.output()
    assert "relay-test.invalid" in relay.output()

    data = yaml.safe_load(path.read_text())
    data["upstreams"][0]["url"] = upstream.url
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    relay.send(signal.SIGHUP)
    await until(lambda: "upstreams changed; that takes a restart" in relay.output(), 5.0, relay)
    assert upstream.requests == []
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(5.0) == 0, relay.output()
    relay.spawn()
    await relay.wait_ready()
    missing = await wait_delivered(upstream, load.acked, 15.0)
    assert not missing, f"{len(missing)} of {len(load.acked)} never arrived"
    assert duplicates(upstream) == 0
    figures(test="dns_failure", acked=len(load.acked), delivered=len(load.acked) - len(missing),
            duplicates=duplicates(upstream), lost=len(missing))


async def until(test: Callable[[], bool], seconds: float, relay: RelayProcess) -> None:
    """Waits for `test` to hold; fails with relay's log if it does not within `seconds`."""
    deadline = time.monotonic() + seconds
    while not test():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {seconds}s\n{relay.output()[-4000:]}")
        await asyncio.sleep(0.05)


async def retries(http: aiohttp.ClientSession, url: str) -> float:
    """relay_delivery_retries_total for upstream seg, from GET /metrics."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "relay_delivery_retries_total" and sample.labels == {
                    "upstream": "seg"}:
                return float(sample.value)
    return 0.0


async def test_vendor_down_longer_than_the_backoff_cap_is_retried_at_the_cap(
        upstream, write_config, start_relay):
    """With backoff_max_seconds 0.2, 3 s of 503s and then 2 s of refused connections: tries
    come at most one cap apart (never slower), and everything arrives once, in order."""
    cap = 0.2
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url,
                          "backoff_initial_seconds": 0.05, "backoff_max_seconds": cap}])
    upstream.default = Reply(503, '{"error":"down"}')
    ids = [f"cap-{n}" for n in range(30)]
    async with start_relay(path) as running, aiohttp.ClientSession() as http:
        for message_id in ids:
            async with http.post(running.url + "/v1/track", headers=AUTH, json={
                    "userId": "u", "event": "E", "messageId": message_id}) as resp:
                assert resp.status == 200
        await asyncio.sleep(3.0)
        tries = [r.at for r in upstream.requests]
        gaps = [b - a for a, b in itertools.pairwise(tries[3:])]
        assert len(tries) >= 3.0 / cap, f"only {len(tries)} tries in 3 s"
        assert max(gaps) < cap + 0.1, f"gaps {gaps}"
        assert min(gaps) > cap / 2 - 0.05, f"gaps {gaps}"
        await upstream.stop()
        before = await retries(http, running.url)
        await asyncio.sleep(2.0)
        refused = await retries(http, running.url) - before
        assert 2.0 / cap * 0.7 <= refused <= 2.0 / (cap / 2) + 2, refused
        upstream.default = Reply()
        await upstream.start()
        got = await upstream.wait_for(len(ids), 5.0)
    assert [m["messageId"] for m in got] == ids
    figures(test="vendor_down_past_cap", cap_seconds=cap, tries_503=len(tries),
            max_gap_seconds=round(max(gaps), 3), retries_refused=int(refused), sent=len(ids),
            delivered=len(got), duplicates=duplicates(upstream), lost=len(ids) - len(got))


@pytest.fixture
async def stored_database(upstream, write_config, start_relay, tmp_path) -> tuple[Path, Path]:
    """A real relay database holding 600 undelivered messages (upstream down), cleanly closed;
    returns (its path, the config file)."""
    await upstream.stop()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}],
                        listen=f"127.0.0.1:{free_port()}")
    async with start_relay(path) as running, aiohttp.ClientSession() as http:
        for n in range(20):
            batch = [{"type": "track", "userId": f"u{i}", "event": "Kept", "messageId": f"{n}-{i}",
                      "properties": {"pad": "x" * 500}} for i in range(30)]
            async with http.post(running.url + "/v1/batch", headers=AUTH,
                                 json={"batch": batch}) as resp:
                assert resp.status == 200
        db = Path(running.config.storage.path)
    return db, path


def tear(db: Path, how: str) -> None:
    """Damages `db` in place: cut in the middle, or its 100-byte header overwritten."""
    data = db.read_bytes()
    if how == "truncated":
        db.write_bytes(data[:len(data) // 2])
    else:
        db.write_bytes(b"\xde\xad\xbe\xef" * 25 + data[100:])


@pytest.mark.parametrize("how", ["truncated", "header"])
def test_torn_or_corrupt_database_stops_serve_with_a_way_out_and_keeps_the_file(
        how, stored_database, tmp_path):
    """`relay serve` on a torn or overwritten database exits 1 with the salvage advice, never
    listens, and leaves the file byte for byte as it was."""
    db, config_path = stored_database
    shutil.copy(db, tmp_path / "intact.db")
    tear(db, how)
    before = db.read_bytes()
    port = yaml.safe_load(config_path.read_text())["listen"].rpartition(":")[2]
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config_path)],
        capture_output=True, text=True, timeout=30, env=clean_env(), cwd=str(tmp_path),
        check=False)
    assert result.returncode == 1, result
    assert f"relay: cannot open storage {db}:" in result.stderr, result.stderr
    assert "Nothing was changed." in result.stderr
    assert f"relay salvage --config {config_path} --to NEW.db" in result.stderr
    assert "listening on" not in result.stderr
    assert f"127.0.0.1:{port}" not in result.stdout
    assert db.read_bytes() == before, "relay changed the damaged file"
    figures(test=f"corrupt_db_{how}", exit=result.returncode, bytes_unchanged=True)


def test_relay_salvage_recovers_the_readable_half_of_a_torn_database(
        stored_database, tmp_path):
    """The way out relay prints (`relay salvage --to NEW.db`) copies the intact messages of the
    readable part of a database cut in the middle into a new file, and leaves the damaged file
    as it was."""
    db, config_path = stored_database
    tear(db, "truncated")
    before = db.read_bytes()
    new = tmp_path / "salvaged.db"
    result = subprocess.run(
        [sys.executable, "-m", "relay", "salvage", "--config", str(config_path), "--to",
         str(new)], capture_output=True, text=True, timeout=60, env=clean_env(), check=False)
    assert result.returncode == 0, result
    assert db.read_bytes() == before, "salvage changed the damaged file"
    with sqlite3.connect(new) as conn:
        saved = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        ids = [json.loads(b)["messageId"] for (b,) in conn.execute("SELECT body FROM outbox")]
    assert f"outbox: {saved} row(s)" in result.stdout
    assert 0 < saved < 600 and len(set(ids)) == saved
    figures(test="corrupt_db_salvage", stored=600, outbox_rows_salvaged=saved)


async def test_the_database_folder_removed_under_relay_still_lets_it_stop(
        spawn_relay, upstream, tmp_path):
    """The folder of relay's database removed while it runs with messages waiting (the vendor
    down), then SIGTERM: relay says what it could not do and exits, instead of hanging on the
    connections that the failed steps of its shutdown left open."""
    await upstream.stop()
    folder = tmp_path / "data"
    relay = await spawn_relay([{"name": "seg", "kind": "segment", "url": upstream.url}],
                              storage={"path": str(folder / "relay.db"), "synchronous": "normal"})
    async with aiohttp.ClientSession() as http, http.post(
            relay.url + "/v1/track", json={"userId": "u1", "event": "E"}, headers=AUTH) as answer:
        assert answer.status == 200
    shutil.rmtree(folder)
    relay.send(signal.SIGTERM)
    code = await relay.wait_exit(20)
    assert code is not None, f"relay did not exit:\n{relay.output()[-3000:]}"
    assert "cannot read what is kept" in relay.output_of_last_start(), relay.output()
    assert "damaged" not in relay.output() and "salvage" not in relay.output(), relay.output()
