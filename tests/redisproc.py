"""A real redis-server (Debian's package) for the tests: started on a free loopback port in a
folder of the test's, stopped by its pid. No persistence unless asked for: a restart is an empty
Redis, as a managed one without persistence would be."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from fakes import free_port

REDIS_SERVER = shutil.which("redis-server")
# Where CI runs (it installs redis-server) a missing server fails the tests instead of skipping.
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None and not os.environ.get("CI"),
    reason="needs Debian's redis-server (apt-get install -y redis-server; .ci/run installs it)")


class RedisServer:
    """One redis-server process; `start` again after `kill` or `stop` gives an empty one on the
    same port (unless `persist`)."""

    def __init__(self, folder: Path, password: str | None = None, persist: bool = False,
                 *args: str) -> None:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.persist = persist
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether redis-server can be started here (CI installs it, so there it must be)."""
        return REDIS_SERVER is not None or bool(os.environ.get("CI"))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None
        argv = [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--daemonize", "no", "--protected-mode", "no",
                "--save", "", "--appendonly", "yes" if self.persist else "no", *self.args]
        if self.password:
            argv += ["--requirepass", self.password]
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        """A plain client of this server (for the tests' own looks and faults)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           decode_responses=True, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crash would: what it held is gone unless it persisted."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
