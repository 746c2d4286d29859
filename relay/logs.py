"""Log lines: readable by people by default, JSON lines for collectors; each of bounded size.

A line may quote what a client sent (aiohttp puts the bytes it could not parse in its error), and
a client decides how much that is: every message and traceback line is cut to a bounded length.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from typing import Literal

from relay import clock

Format = Literal["human", "json"]

# Characters of one log record's message, of one line of its traceback, and of the traceback.
MAX_MESSAGE = 2000
MAX_TRACE_LINE = 1000
MAX_TRACE = 8000


def bounded(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters (saying how many were cut) when it is longer."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters]"


def _capped(record: logging.LogRecord, trace: str | None) -> logging.LogRecord:
    """A copy of `record` whose message and traceback are bounded."""
    out = copy.copy(record)
    out.msg, out.args = bounded(record.getMessage(), MAX_MESSAGE), None
    if trace is not None:
        lines = [bounded(line, MAX_TRACE_LINE) for line in trace.splitlines()]
        out.exc_text = bounded("\n".join(lines), MAX_TRACE)
    return out


class HumanFormatter(logging.Formatter):
    """`time LEVEL message`, with the traceback (if any) below it."""

    def __init__(self, worker: int | None = None) -> None:
        who = "" if worker is None else f"[worker {worker}] "
        super().__init__(f"%(asctime)s %(levelname)s {who}%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        trace = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        return super().format(_capped(record, trace))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback, if any), and
    the worker's number when relay runs several."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        trace = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        capped = _capped(record, trace)
        line: dict[str, object] = {
            "time": clock.iso(clock.datetime_of(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": capped.msg,
        }
        if capped.exc_text:
            line["error"] = capped.exc_text
        if self.worker is not None:
            line["worker"] = self.worker
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: Format, worker: int | None = None) -> None:
    """Sends every logger's lines to stderr in `fmt`; a worker's say which it is."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else HumanFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def mask(key: str) -> str:
    """A write key as logs may show it: enough to tell keys apart, never enough to use one."""
    return f"{key[:4]}…" if len(key) > 8 else "…" if key else "(none)"
