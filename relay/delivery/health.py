"""How one upstream is faring: what its answers mean (keep and retry, pause), the backoff
between tries, and the log lines about it (one a minute while it keeps failing)."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay import clock
from relay.metrics import Metrics

if TYPE_CHECKING:  # the config is read by every stage; it imports the stages itself
    from relay.config.model import Upstream

log = logging.getLogger("relay.forwarder")

RETRY_AFTER_CAP = 300.0
STORAGE_RETRY_SECONDS = 1.0
FAILURE_LOG_SECONDS = 60.0  # while an upstream keeps failing, one line a minute is enough


@dataclass(frozen=True)
class Answer:
    """What the upstream said to one batch; status 0 when it said nothing (refused, timed out)."""

    status: int
    text: str
    retry_after: float | None = None


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value.strip() else None
        if parsed is None or parsed.tzinfo is None:
            return None
        seconds = (parsed - clock.now()).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def retryable(status: int) -> bool:
    """Whether keeping the batch and trying again later is right for `status` (§3.8)."""
    return status == 0 or status in (408, 410, 429, 460) or status >= 500


class Health:
    """An upstream's failures in a row, whether it is paused, and whether the last failure had
    no answer at all (refused, DNS, reset: the vendor is then probed while the backoff runs)."""

    def __init__(self, upstream: Upstream, url: str, metrics: Metrics) -> None:
        self.upstream = upstream
        self.url = url
        self.metrics = metrics
        self.failures = 0
        self.paused = False
        self.unreachable = False
        self._last_failure_log = -FAILURE_LOG_SECONDS

    def backoff(self, answer: Answer, batch_size: int) -> float:
        self.failures += 1
        self.unreachable = answer.status == 0
        ceiling = min(
            self.upstream.backoff_max_seconds,
            self.upstream.backoff_initial_seconds * 2 ** min(self.failures - 1, 30),
        )
        wait = random.uniform(ceiling / 2, ceiling)
        if answer.retry_after is not None:
            wait = max(wait, answer.retry_after)
        self.metrics.retries.labels(self.upstream.name).inc()
        now = time.monotonic()
        if self.failures == 1 or now - self._last_failure_log >= FAILURE_LOG_SECONDS:
            self._last_failure_log = now
            log.warning(
                "upstream %s: batch of %d failed (%s), attempt %d; messages kept, next try in"
                " %.1fs", self.upstream.name, batch_size, describe(answer), self.failures, wait,
            )
        return wait

    def storage_failed(self, exc: Exception) -> float:
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_SECONDS:
            self._last_failure_log = now
            log.warning("upstream %s: cannot read or update the outbox (%s); trying again",
                        self.upstream.name, exc)
        return STORAGE_RETRY_SECONDS

    def pause(self, answer: Answer) -> float:
        if not self.paused:
            hint = (f"{self.url} is no {self.upstream.kind} batch endpoint: check its url (the"
                    " vendor's base, like https://api.segment.io)" if answer.status == 404
                    else "Check its url and write_key")
            log.error(
                "upstream %s: paused, answer %s; messages are kept. %s; relay tries again every"
                " %.0fs", self.upstream.name, describe(answer), hint, self.upstream.pause_seconds,
            )
        self.paused = True
        return self.upstream.pause_seconds

    def recovered(self) -> None:
        if self.failures or self.paused:
            log.info("upstream %s: delivering again", self.upstream.name)
        self.failures = 0
        self.paused = False
        self.unreachable = False


def describe(answer: Answer) -> str:
    if answer.status == 0:
        return answer.text
    return f"{answer.status} {one_line(answer.text)[:120]}"


def one_line(text: str) -> str:
    return " ".join(text.split())
