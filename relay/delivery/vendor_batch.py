"""What each vendor kind takes as a batch: its path, the body joined from stored messages without
parsing them again, and the headers (shared/docs/protocol.md §1.2)."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from relay import clock

BATCH_PATHS = {"segment": "/v1/batch", "rudderstack": "/v1/batch", "june": "/sdk/batch"}


def batch_url(kind: str, base_url: str) -> str:
    """Where an upstream of `kind` takes batches."""
    return base_url.rstrip("/") + BATCH_PATHS[kind]


def batch_body(kind: str, bodies: list[str], key: str, sent_at: datetime) -> bytes:
    """A batch request body from stored messages, joined without re-parsing them."""
    tail = f',"sentAt":"{clock.iso(sent_at)}"'
    if kind == "segment" and key:
        tail += f',"writeKey":{json.dumps(key)}'
    return ('{"batch":[' + ",".join(bodies) + "]" + tail + "}").encode()


def batch_headers(key: str) -> dict[str, str]:
    """Headers for a batch: Basic auth with the key as user and an empty password (§1.2)."""
    headers = {"Content-Type": "application/json", "User-Agent": "relay/0.1"}
    if key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    return headers
