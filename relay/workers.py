"""`relay serve` with `workers: N` above 1: this process starts N worker processes that each serve
`listen` (the kernel spreads connections over them: SO_REUSEPORT), each with its own SQLite file
(`relay.ops.worker_files`) and forwarders, all sharing user state through Redis. It forwards
SIGTERM,
SIGINT and SIGHUP to them, starts again one that dies, and ends when they all have.

Killed with SIGKILL itself, its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), finish
what is in flight and stop as on any SIGTERM: nothing accepted is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import multiprocess

from relay.config.model import Config
from relay.ops import worker_files

log = logging.getLogger("relay")

WORKER = "RELAY_WORKER"  # the worker's number, in its environment
RESTART_SECONDS = 1.0
# A worker that ends this soon after it started, twice running, will not start at all (a port
# taken, a database it cannot open): relay stops rather than start it again and again.
EARLY_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


def worker_number() -> int | None:
    """This process's worker number, when the supervisor started it."""
    value = os.environ.get(WORKER, "")
    return int(value) if value.isdigit() and int(value) >= 1 else None


class Supervisor:
    """Starts and watches the workers of `config` (`run`)."""

    def __init__(self, config: Config, argv: list[str]) -> None:
        self.config = config
        self.argv = argv  # `relay serve` as this process was started, for each worker
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.early: dict[int, int] = {}
        self.stopping = False
        self.failed = False
        self.metrics = tempfile.mkdtemp(prefix="relay-metrics-")

    def run(self) -> int:
        """Until every worker has ended after a stop; 0 when they all ended well."""
        moved = worker_files.merge_leftovers(self.config)
        if moved:
            log.info("storage: %d row(s) moved from the files of workers that are gone", moved)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signalled)
        try:
            for number in range(1, self.config.workers + 1):
                self._start(number)
            log.info("relay: %d workers serving %s", self.config.workers, self.config.listen)
            codes = self._watch()
        finally:
            shutil.rmtree(self.metrics, ignore_errors=True)
        return 0 if not self.failed and all(code == 0 for code in codes) else 1

    def _start(self, number: int) -> None:
        env = {**os.environ, WORKER: str(number), "PROMETHEUS_MULTIPROC_DIR": self.metrics}
        self.workers[number] = subprocess.Popen(
            [sys.executable, "-m", "relay", *self.argv], env=env, stdin=subprocess.DEVNULL,
            preexec_fn=_end_with_parent)  # noqa: PLW1509 (async-signal-safe: one prctl call)
        self.started[number] = time.monotonic()

    def _watch(self) -> list[int]:
        codes: list[int] = []
        while self.workers:
            time.sleep(0.05)
            for number, proc in list(self.workers.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.workers[number]
                _forget_metrics(self.metrics, proc.pid)
                if self.stopping:  # one asked to stop before it could handle it ended so
                    codes.append(0 if code == -signal.SIGTERM else code)
                else:
                    self._died(number, code)
        return codes

    def _died(self, number: int, code: int) -> None:
        early = time.monotonic() - self.started[number] < EARLY_SECONDS
        self.early[number] = self.early.get(number, 0) + 1 if early else 0
        if self.early[number] >= 2:
            log.error("relay: worker %d ended %d times just after it started (exit %d);"
                      " stopping", number, self.early[number], code)
            self.failed = True
            self._signalled(signal.SIGTERM, None)
            return
        log.error("relay: worker %d ended (exit %d); starting it again", number, code)
        time.sleep(RESTART_SECONDS)
        self._start(number)

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGHUP:
            self.stopping = True
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if sig == signal.SIGINT else sig)


def _end_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor ends, even by SIGKILL (Linux;
    elsewhere nothing), and SIGHUP ignored until relay handles it (its default would end a
    worker that is still starting; what it would reload, the start reads anyway)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _forget_metrics(folder: str, pid: int) -> None:
    """A worker's live gauges leave /metrics with it; its counters stay in the totals."""
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
