"""The image built from the project's Dockerfile, run with podman: run by `deploy/test-image`,
which builds it and names it in RELAY_IMAGE (without it, these tests skip and say why).

Each container runs the shipped config, as a user would start it: its port published on a free
loopback port, its vendor (a fake one on this machine's 127.0.0.1) reached at 10.0.2.2 through
slirp4netns' `allow_host_loopback`, its outbox in a named volume. Containers and volumes are
removed when each test ends.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fakes import FakeUpstream, free_port
from processes import Load, acks_grow, wait_delivered, wait_ready
from segment.analytics.client import Client as SegmentClient

IMAGE = os.environ.get("RELAY_IMAGE", "")
RUNTIME = os.environ.get("RELAY_PODMAN_RUNTIME", "")
# slirp4netns maps this address to the host's own loopback, where the fake vendor listens.
HOST_LOOPBACK = "10.0.2.2"
READY_SECONDS = 30.0
PODMAN_SECONDS = 60.0

pytestmark = pytest.mark.skipif(
    not IMAGE, reason="the image tests run through deploy/test-image, which builds the image")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One podman command (with the runtime deploy/test-image chose); its output as text."""
    command = ["podman", *(["--runtime", RUNTIME] if RUNTIME else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=PODMAN_SECONDS,
                          check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    return done


@dataclass
class Containers:
    """Containers of the image, all on one named volume; every one removed at teardown."""

    volume: str
    vendor: FakeUpstream
    names: list[str] = field(default_factory=list)

    def run(self, *extra: str) -> Container:
        """A new container on the volume, started, its port published on a free loopback port."""
        name = f"relay-test-{uuid.uuid4().hex[:8]}"
        port = free_port()
        podman("run", "-d", "--name", name, "--pull=never",
               "--network", "slirp4netns:allow_host_loopback=true",
               "-p", f"127.0.0.1:{port}:8080", "-v", f"{self.volume}:/data",
               "-e", f"SEGMENT_URL=http://{HOST_LOOPBACK}:{self.vendor.port}",
               "-e", "RELAY_STAFF_DOMAIN=example.com", *extra, IMAGE)
        self.names.append(name)
        return Container(name, port)

    def remove(self) -> None:
        for name in self.names:
            podman("rm", "-f", "-t", "0", name, check=False)
        podman("volume", "rm", "-f", self.volume, check=False)


@dataclass
class Container:
    """One running container of the image."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def running(self) -> int | None:
        """None while the container runs, else its exit code (as a child's `poll`)."""
        state = podman("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}",
                       self.name).stdout.split()
        return None if state[0] == "true" else int(state[1])

    async def ready(self) -> Container:
        await wait_ready(self.running, self.url, self.logs, READY_SECONDS)
        return self


@pytest.fixture
def containers(upstream: FakeUpstream) -> Iterator[Containers]:
    """Containers of the image on a fresh named volume, their vendor the fake one on this
    machine's loopback (reached through slirp4netns); all removed, volume too, afterwards."""
    made = Containers(f"relay-test-{uuid.uuid4().hex[:8]}", upstream)
    try:
        yield made
    finally:
        made.remove()


async def test_runs_as_uid_10001_and_its_healthcheck_passes(containers: Containers) -> None:
    """relay, process 1 of the container, runs as uid 10001, and the HEALTHCHECK kept in the
    image (its own command, as the engine runs it) passes once relay is ready."""
    box = await containers.run().ready()
    status = podman("exec", box.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, status
    assert "relay" in podman("exec", box.name, "cat", "/proc/1/cmdline").stdout
    health = podman("inspect", "--format", "{{json .Config.Healthcheck}}", box.name).stdout
    assert "/readyz" in health, f"no HEALTHCHECK in the image: {health}"
    checked = podman("healthcheck", "run", box.name, check=False)
    assert checked.returncode == 0, f"healthcheck failed: {checked.stdout}{checked.stderr}"


async def test_a_real_sdks_events_reach_the_vendor_through_the_shipped_rules(
        containers: Containers, upstream: FakeUpstream) -> None:
    """Events from segment-analytics-python reach the vendor through the container, with the
    shipped rules applied: a track after a group call carries context.groupId, a staff user's
    events (email at RELAY_STAFF_DOMAIN) are dropped."""
    box = await containers.run().ready()
    errors: list[object] = []
    client = SegmentClient(write_key="WK_image", host=box.url, upload_interval=0.05,
                           max_retries=0, timeout=5, on_error=lambda e, b: errors.append(e))
    try:
        client.identify("staff-1", {"email": "ops@example.com"})
        client.track("staff-1", "Looked Around")
        client.identify("u1", {"email": "u1@customer.test"})
        client.group("u1", "acme", {"name": "Acme"})
        client.track("u1", "Report Built")
    finally:
        await asyncio.to_thread(client.shutdown)
    assert errors == []
    got = await upstream.wait_for(3, seconds=20)
    await asyncio.sleep(0.5)  # the dropped ones would have come by now, at 50 ms a batch
    got = upstream.accepted()
    assert [(m["type"], m.get("userId")) for m in got] == [
        ("identify", "u1"), ("group", "u1"), ("track", "u1")]
    assert got[2]["context"]["groupId"] == "acme"
    assert upstream.requests[0].headers["Authorization"].startswith("Basic ")


async def test_sigkill_under_load_then_a_new_container_on_the_volume_delivers_every_200(
        containers: Containers, upstream: FakeUpstream) -> None:
    """With the vendor down, SDK-like load is answered 200 and kept in /data; `podman kill -s
    KILL` mid-load; a new container on the same volume, the vendor back, delivers every message
    that was answered 200."""
    box = await containers.run().ready()
    await upstream.stop()
    async with Load(box.url, tag="img") as load:
        assert await acks_grow(load, 1.5) > 100, f"little load answered 200\n{box.logs()}"
        podman("kill", "-s", "KILL", box.name)
        await asyncio.sleep(0.3)  # the load meets a dead port for a moment, as SDKs would
    assert load.statuses == Counter(), f"answers other than 200: {load.statuses}"
    assert box.running() is not None, "the container outlived SIGKILL"
    await upstream.start()
    again = await containers.run().ready()
    missing = await wait_delivered(upstream, load.acked, 60.0)
    assert not missing, (f"{len(missing)} of {len(load.acked)} messages answered 200 were lost, "
                         f"e.g. {sorted(missing)[:5]}\n{again.logs()[-3000:]}")


async def test_a_read_only_root_filesystem_with_data_a_volume_works(
        containers: Containers, upstream: FakeUpstream) -> None:
    """With `--read-only` (only /data, a volume, writable) relay starts, stores and delivers,
    and the root filesystem really is read-only."""
    box = await containers.run("--read-only").ready()
    refused = podman("exec", box.name, "touch", "/etc/relay/x", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    async with Load(box.url, tag="ro") as load:
        assert await acks_grow(load, 1.0) > 0, f"nothing answered 200\n{box.logs()}"
    assert load.statuses == Counter()
    missing = await wait_delivered(upstream, load.acked, 30.0)
    assert not missing, f"{len(missing)} messages not delivered\n{box.logs()[-3000:]}"
