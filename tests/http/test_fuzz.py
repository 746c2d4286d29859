"""Arbitrary input never makes relay answer 5xx, never stops it, and a refusal stores nothing."""

from __future__ import annotations

import gzip
import http.client
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.ingest import segment

PATHS = [r.path for r in segment.routes()] + ["/v1/unknown", "/", "/sdk/"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20,
)
field_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30), json_values)
messages = st.fixed_dictionaries(
    {},
    optional={k: field_values for k in (
        "type", "userId", "anonymousId", "event", "groupId", "previousId", "messageId",
        "timestamp", "sentAt", "context", "properties", "traits", "integrations", "writeKey",
    )},
)
payloads = st.one_of(
    messages,
    st.fixed_dictionaries({"batch": st.lists(messages, max_size=5)},
                          optional={"context": field_values, "sentAt": field_values,
                                    "writeKey": field_values}),
    json_values,
)
bodies = st.one_of(
    payloads.map(lambda p: json.dumps(p).encode()),
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b"[" * 5000),
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(["application/json", "text/plain", "x/y", "", "\x7f"]),
        "Authorization": st.one_of(st.text(max_size=40), st.binary(max_size=30).map(
            lambda b: "Basic " + b.hex())).map(lambda s: s.encode("latin-1", "replace").decode(
                "latin-1").replace("\n", "").replace("\r", "")),
        "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "bogus"]),
    },
)


@pytest.fixture(scope="module")
def relay_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, int]]:
    """relay as its own process, its upstream unreachable so every accepted row stays put."""
    base = tmp_path_factory.mktemp("fuzz")
    port, db = free_port(), base / "relay.db"
    (base / "relay.yaml").write_text(json.dumps({
        "listen": f"127.0.0.1:{port}", "storage": {"path": str(db), "synchronous": "normal"},
        "upstreams": [{"name": "down", "kind": "segment", "url": f"http://127.0.0.1:{free_port()}",
                       "backoff_initial_seconds": 5, "backoff_max_seconds": 5}],
    }))
    log = (base / "relay.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config",
                             str(base / "relay.yaml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                if status_of(port, "GET", "/readyz") == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield port, db, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def status_of(port: int, method: str, path: str, body: bytes = b"",
              hdrs: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=hdrs or {})
        return conn.getresponse().status
    finally:
        conn.close()


def rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), body=bodies, hdrs=headers, zipped=st.booleans())
def test_random_requests_never_5xx(relay_process, path, body, hdrs, zipped):
    """Any body, path and headers: never a 5xx, relay stays up, a refusal stores nothing."""
    port, db, _ = relay_process
    if zipped and hdrs.get("Content-Encoding") == "gzip":
        body = gzip.compress(body)
    before = rows(db)
    status = status_of(port, "POST", path, body, hdrs)
    assert status < 500
    if status != 200:
        assert rows(db) == before
    assert status_of(port, "GET", "/healthz") == 200


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


TINY = b'{"type":"track","userId":"u","event":"e"}'


@pytest.mark.parametrize(
    ("body", "hdrs", "status", "stored"),
    [
        (b'{"batch":[' + b",".join([b"{}"] * 20_000) + b"]}", {}, 200, 0),
        (b'{"batch":[' + b",".join([TINY] * 20_000) + b"]}", {}, 413, 0),
        (b'{"userId":"u","event":"e","properties":{"n":' + b"9" * 5000 + b"}}", {}, 400, 0),
        (b'{"userId":"u","event":"e","properties":{"n":1e308,"m":-1e-308}}', {}, 200, 1),
        (b'{"userId":"u","event":"e","properties":{"s":"' + b"x" * 400_000 + b'"}}', {}, 413, 0),
        (b'{"userId":"u","event":"e","p":' + b"[" * 3000 + b"]" * 3000 + b"}", {}, 400, 0),
        (gzip.compress(b" " * 50_000_000), {"Content-Encoding": "gzip"}, 413, 0),
        (b"\xff\xfe\x00{", {}, 400, 0),
        (TINY, {"Authorization": "Basic " + "A" * 7000}, 400, 0),
        (TINY, {"Authorization": "Basic \u00e9\u00e9"}, 400, 0),
        (TINY, {"Content-Type": "multipart/form-data; boundary=x"}, 200, 1),
    ],
    ids=["20k-empty-items", "20k-items-over-500KB", "5000-digit-number", "extreme-floats",
         "400KB-string", "3000-deep", "gzip-bomb-50MB", "invalid-utf8", "7000-char-auth",
         "latin1-auth", "odd-content-type"],
)
def test_extreme_inputs_get_clear_answers(relay_process, body, hdrs, status, stored):
    """Extreme inputs get the answer named here, and only a 200 stores anything."""
    port, db, _ = relay_process
    before = rows(db)
    assert status_of(port, "POST", "/v1/batch" if body.startswith(b'{"batch"') else "/v1/track",
                     body, hdrs) == status
    assert rows(db) - before == stored
    assert status_of(port, "GET", "/healthz") == 200


def test_memory_stays_bounded_after_the_fuzzing(relay_process):
    """After every fuzzed and extreme request above, relay's resident memory is still small."""
    port, _, pid = relay_process
    assert status_of(port, "GET", "/healthz") == 200
    assert rss_mb(pid) < 150, f"relay holds {rss_mb(pid):.0f} MB after the fuzzing"
