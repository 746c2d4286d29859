"""The write-ahead log is moved into the database file by relay's checkpoint thread, so commits
never do it themselves and the log does not grow while relay runs."""

from __future__ import annotations

import asyncio
import os

import aiohttp

PAD = "x" * 2_000


def size(path: str) -> int:
    return os.stat(path).st_size


async def test_the_log_reaches_the_database_file_while_relay_runs(
        upstream, write_config, start_relay):
    """With the upstream down (so nothing is deleted), ~4 MB of accepted messages end up in the
    database file itself within a few seconds, and the log stops growing past what one
    checkpoint interval writes."""
    await upstream.stop()
    path = write_config([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with start_relay(path) as running, aiohttp.ClientSession() as http:
        db = running.config.storage.path
        empty = size(db)
        for n in range(20):
            batch = [{"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"{n}-{i}",
                      "properties": {"pad": PAD}} for i in range(100)]
            async with http.post(running.url + "/v1/batch", json={"batch": batch}) as resp:
                assert resp.status == 200
        outbox = running.relay.outbox
        for _ in range(50):
            if size(db) > empty + 3_000_000 and outbox.checkpoints() > 0:
                break
            await asyncio.sleep(0.1)
        assert size(db) > empty + 3_000_000, (empty, size(db))
        assert outbox.checkpoints() > 0
