"""Prometheus metrics: one registry per running relay, rendered by prometheus-client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.outbox.stats import QueueStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# What one request did, for the message counters: (what, label, label) -> how many.
Tally = dict[tuple[str, str, str], int]


class Metrics:
    """Every series relay exports; the queue gauges are refreshed on each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, str, str], Any] = {}
        self._answers: dict[tuple[str, int], Any] = {}
        self.requests = self._counter("requests", "HTTP requests answered on the event routes",
                                      "route", "status")
        self.received = self._counter("messages_received", "Valid messages received", "type")
        self.dropped = self._counter("messages_dropped", "Messages not forwarded, by rule id"
                                     " (protocol: the vendor would drop them) and reason",
                                     "rule", "reason")
        self.changed = self._counter("messages_changed", "Messages a rule changed", "rule")
        self.outbox_messages = self._gauge("outbox_messages", "Messages waiting")
        self.outbox_bytes = self._gauge("outbox_bytes", "Bytes of the messages waiting")
        self.outbox_age = self._gauge("outbox_oldest_age_seconds", "Age of the oldest waiting")
        self.deliveries = self._counter("deliveries", "Batch requests, by the answer's status"
                                        " (error: none came)", "upstream", "status")
        self.retries = self._counter("delivery_retries", "Batches kept to try again", "upstream")
        self.dead_letters = self._counter("dead_letters", "Messages set aside", "upstream")
        self.batch_messages = Histogram(
            "relay_batch_messages", "Messages per batch sent", registry=self.registry,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500))
        self.connections_open = Gauge("relay_connections_open", "Client connections open",
                                      registry=self.registry, multiprocess_mode="livesum")
        self.connections_held = Gauge(
            "relay_connection_held_bytes", "Bytes of requests relay holds for its client"
            " connections: bodies being read and answered, bytes kept for a handover",
            registry=self.registry, multiprocess_mode="livesum")
        self.store_up = Gauge("relay_state_store_up", "1 while the shared state store (Redis)"
                              " answers, 0 while it does not (with workers: while every worker"
                              " finds it so)", registry=self.registry, multiprocess_mode="livemin")
        self.store_seconds = Histogram(
            "relay_state_store_seconds", "Round trips of the reads of user state from Redis",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
        self.without_store = self._counter(
            "state_without_store_messages", "Messages whose rules ran without Redis's answer"
            " (decided: from what this relay knows; held: their rules run once it is back)",
            "how")
        self.tap_viewers = Gauge("relay_tap_viewers", "Streams of /admin/tap open",
                                 registry=self.registry, multiprocess_mode="livesum")
        self.viewers: Callable[[], int] = lambda: 0
        # (connections open, bytes held), from the listener once it listens.
        self.connections: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.ingest_seconds = Histogram(
            "relay_ingest_seconds", "Time from request to answer on the event routes",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def _counter(self, name: str, text: str, *labels: str) -> PromCounter:
        return PromCounter(f"relay_{name}", text, labels, registry=self.registry)

    def _gauge(self, name: str, text: str) -> Gauge:
        # With workers, the one scraped reads every worker's queue: its values are the ones.
        return Gauge(f"relay_{name}", f"{text}, by upstream", ["upstream"], registry=self.registry,
                     multiprocess_mode="livemostrecent")

    def record(self, tally: Tally) -> None:
        """Adds a stored request's tally: ("received", type, ""), ("changed", rule, ""),
        ("dropped", rule, reason)."""
        children = self._children
        for key, n in tally.items():
            child = children.get(key)
            if child is None:
                child = children[key] = self._child(*key)
            child.inc(n)

    def _child(self, what: str, first: str, second: str) -> Any:
        if what == "received":
            return self.received.labels(first)
        if what == "changed":
            return self.changed.labels(first)
        return self.dropped.labels(first, second)

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
        opened, held = self.connections()
        self.connections_open.set(opened)
        self.connections_held.set(held)
        self.tap_viewers.set(self.viewers())
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()  # with workers: all of them, added up
        multiprocess.MultiProcessCollector(every_worker, folder)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)
