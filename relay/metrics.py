"""Prometheus metrics: one registry per running relay, rendered by prometheus-client."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.inventory import QueueStats

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every series relay exports; the queue gauges are refreshed on each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._answers: dict[tuple[str, int], Any] = {}
        r = self.registry
        self.requests = Counter("relay_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.received = Counter("relay_messages_received", "Messages received, by type",
                                ["type"], registry=r)
        self.dropped = Counter("relay_messages_dropped", "Messages not forwarded, by the rule"
                               " (or `protocol` for ones the vendor would drop) and reason",
                               ["rule", "reason"], registry=r)
        self.changed = Counter("relay_messages_changed", "Messages a rule changed, by rule",
                               ["rule"], registry=r)
        self.outbox_messages = Gauge("relay_outbox_messages", "Messages waiting, by upstream",
                                     ["upstream"], registry=r)
        self.outbox_bytes = Gauge("relay_outbox_bytes", "Bytes of messages waiting, by upstream",
                                  ["upstream"], registry=r)
        self.outbox_age = Gauge("relay_outbox_oldest_age_seconds",
                                "Age of the oldest waiting message, by upstream", ["upstream"],
                                registry=r)
        self.deliveries = Counter("relay_deliveries", "Batch requests to upstreams, by the answer"
                                  " status (`error` when none came)", ["upstream", "status"],
                                  registry=r)
        self.retries = Counter("relay_delivery_retries", "Batches kept to try again, by upstream",
                               ["upstream"], registry=r)
        self.dead_letters = Counter("relay_dead_letters", "Messages set aside as dead letters,"
                                    " by upstream", ["upstream"], registry=r)
        self.batch_messages = Histogram("relay_batch_messages", "Messages per batch sent",
                                        buckets=(1, 10, 50, 100, 250, 500, 1000, 2500),
                                        registry=r)
        self.ingest_seconds = Histogram("relay_ingest_seconds", "Time from request to answer on"
                                        " the event routes", registry=r,
                                        buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                 0.25, 0.5, 1.0, 2.5))

    def answered(self, route: str, status: int) -> None:
        """Counts one answer; the labelled child is looked up once per route and status."""
        child = self._answers.get((route, status))
        if child is None:
            child = self._answers[(route, status)] = self.requests.labels(route, str(status))
        child.inc()

    def render(self, queues: Iterable[QueueStats]) -> bytes:
        """The exposition text, with the queue gauges as they are now."""
        for q in queues:
            self.outbox_messages.labels(q.upstream).set(q.messages)
            self.outbox_bytes.labels(q.upstream).set(q.bytes)
            self.outbox_age.labels(q.upstream).set(q.oldest_age_seconds)
        return generate_latest(self.registry)
