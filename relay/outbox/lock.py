"""One relay per database: an exclusive lock on a file beside it, held for the process's life.

Two relays on one file would run two sets of forwarders on one outbox and send every message
twice; a second one on the same `storage.path` exits at once, saying which process holds it. The
kernel lets go of the lock when the holder dies, kill -9 included, so a stale lock cannot stop a
restart. The queue commands (`relay queue …`) do not take it: they are meant to run beside relay.
"""

from __future__ import annotations

import os
from typing import IO

try:
    import fcntl
except ImportError:  # not on Windows: there one relay per file is the operator's to keep
    fcntl = None  # type: ignore[assignment]


class StorageInUse(Exception):
    """Another process holds the database's lock."""


def take(database: str) -> IO[str] | None:
    """Locks `database` for this process (the open lock file: keep it as long as relay runs);
    raises StorageInUse naming the holder's pid when another process has it."""
    if fcntl is None:
        return None
    path = f"{database}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StorageInUse(f"{database} is in use by another relay (pid {holder}); stop it, or"
                           " give this one another storage.path") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
