"""Hot reload: on SIGHUP or a change of the config file, new rules replace the old between
messages; an invalid file, or any failure to load it, keeps the running ones. State is untouched
by a reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable

from relay.config import model as config
from relay.config.model import Config

log = logging.getLogger("relay.reload")

Apply = Callable[[Config], None]
# What a reload changes in a running relay; any other difference needs a restart.
LIVE = frozenset({"rules", "write_keys", "on_rule_error", "file", "warnings", "worker"})


class Reloader:
    """Watches `path` (polling every `interval` seconds); `ask` is SIGHUP's handler."""

    def __init__(self, path: str, current: Config, apply: Apply, interval: float = 1.0) -> None:
        self.path = path
        self.started = current  # what the parts that take a restart still run with
        self.current = current
        self.apply = apply
        self.interval = interval
        self._seen = _stamp(path)
        self._wake = asyncio.Event()

    def ask(self) -> None:
        """A reload is asked for (SIGHUP): it happens at once."""
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled: reload whenever the file changes or a reload is asked for. Nothing
        that happens in a reload ends this loop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            asked = self._wake.is_set()
            self._wake.clear()
            try:
                stamp = _stamp(self.path)
                if asked or stamp != self._seen:
                    self._seen = stamp
                    self.reload("SIGHUP" if asked else "file changed")
            except Exception:
                log.exception("reload: failed; the running config stays")

    def reload(self, why: str) -> bool:
        """Loads the file again and applies it if valid; True when applied."""
        try:
            new = config.load(self.path)
        except config.ConfigError as exc:
            log.error("reload (%s): config has %d error(s); the running rules stay",
                      why, len(exc.errors))
            for line in exc.errors:
                log.error("reload: %s", line)
            return False
        except Exception as exc:  # a fault of relay's own loading: never the end of relay
            log.exception("reload (%s): cannot load %s (%s: %s); the running rules stay",
                          why, self.path, type(exc).__name__, exc)
            return False
        for note in new.warnings:
            log.warning("reload: %s", note)
        fixed = [f.name for f in dataclasses.fields(Config)
                 if f.name not in LIVE and getattr(new, f.name) != getattr(self.started, f.name)]
        if fixed:
            log.warning("reload: %s changed; that takes a restart, the rest is applied now",
                        ", ".join(fixed))
        self.apply(new)
        self.current = new
        log.info("reload (%s): %d rule(s) in force", why, len(new.rules))
        return True


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size)
