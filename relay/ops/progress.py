"""A progress bar on stderr for long CLI work: redrawn in place on a terminal, else per tenth."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# What long work calls as it goes: (items done, items in all).
Progress = Callable[[int, int], None]


def silent(done: int, total: int) -> None:
    """A Progress that shows nothing."""


class Bar:
    """Shows `label [#####-----] done/total  pct  rate/s` for work of at least `min_total` items.

    On a terminal the line is redrawn with `\\r` at most every `interval` seconds; elsewhere (a log
    file, a pipe) one line is written each time another tenth of the work is done. Call the bar as
    a Progress, then `close()` once the work is over.
    """

    def __init__(self, label: str, stream: TextIO | None = None, min_total: int = 1000,
                 interval: float = 0.1, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.min_total = min_total
        self.interval = interval
        self.width = width
        self.tty = self.stream.isatty()
        self._started = time.monotonic()
        self._drawn = 0.0
        self._tenths = 0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        total = max(total, done)
        if total < self.min_total:
            return
        now = time.monotonic()
        if self.tty:
            if done == total or now - self._drawn >= self.interval:
                self._drawn = now
                self._write("\r" + self._line(done, total, now) + "\x1b[K")
            return
        tenths = done * 10 // total
        if tenths > self._tenths:
            self._tenths = tenths
            self._write(self._line(done, total, now) + "\n")

    def close(self) -> None:
        """Ends the bar's line on a terminal, so that what is printed next starts afresh."""
        if self.tty and self._shown:
            self._write("\n")
        self._shown = False

    def _line(self, done: int, total: int, now: float) -> str:
        rate = done / max(now - self._started, 1e-6)
        if not self.tty:
            return f"{self.label}: {done}/{total} ({done * 100 // total}%), {rate:.0f}/s"
        filled = self.width * done // total
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.label} [{bar}] {done}/{total} {done * 100 // total:3d}% {rate:.0f}/s"

    def _write(self, text: str) -> None:
        self._shown = True
        self.stream.write(text)
        self.stream.flush()
