"""relay as a child process, and SDK-like load on it: shared by the process-level tests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstream

AUTH = {"Authorization": "Basic " + base64.b64encode(b"WK:").decode()}
READY_SECONDS = 10.0


async def wait_ready(exit_code: Callable[[], int | None], url: str, log: Callable[[], str],
                     seconds: float = READY_SECONDS) -> None:
    """Polls GET /readyz until it answers 200; fails with the log if the child exits first
    (`exit_code()` is no longer None) or it never does."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        while time.monotonic() < deadline:
            if (code := exit_code()) is not None:
                pytest.fail(f"relay exited {code} while starting:\n{log()}")
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"relay not ready within {seconds}s:\n{log()}")


def clean_env() -> dict[str, str]:
    """The test's environment without anything that would change which config relay reads."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "SEGMENT_"))}
    env["RELAY_LOG_LEVEL"] = "INFO"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def alive_as(pid: int, word: str) -> bool:
    """Whether process `pid` runs and has `word` in its command line (not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return word.encode() in cmdline and state != "Z"


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

    def writer_pids(self) -> list[int]:
        """The pids of relay's writer processes (its children running
        `relay.outbox.writer_child`)."""
        return self._children("relay.outbox.writer_child")

    def serving_pids(self) -> list[int]:
        """The pids of relay's worker processes (with `workers` above 1: its `relay serve`
        children)."""
        return self._children("serve")

    def _children(self, running: str) -> list[int]:
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        return [int(child) for child in children if alive_as(int(child), running)]

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
        await wait_ready(self.proc.poll, self.url, self.output, seconds)

    async def wait_exit(self, seconds: float) -> int | None:
        """The exit status, or None if still running after `seconds`."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while (code := self.proc.poll()) is None:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.02)
        return code


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


