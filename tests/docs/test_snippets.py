"""Every fenced code block of README.md and docs/*.md that a user would copy, run for real.

A block's kind is its info string: the language, then an optional qualifier (```js browser).
Each kind is exercised as follows; a block of any other kind, or with no info string, fails
`test_every_block_is_of_a_kind_this_test_runs`, so a new snippet cannot go untested:

- `text`: output, before/after samples and command synopses, which nobody copies as they are:
  not run.
- `yaml`: a relay config, through `relay check` (exit 0 and no warning). A block with `upstreams`
  is a whole config and is checked as written. Any other block is a fragment: it is merged into
  the shipped config/relay.yaml (a mapping into a mapping key by key, recursively; any other value,
  lists included, replaces the shipped one) and the result is checked.
- `yaml prometheus`: alerting rules; every `relay_*` metric an `expr` names is one a running relay
  serves at /metrics.
- `python`: an SDK snippet, run by a Python that has the SDK; `js`: a Node SDK snippet, run by
  `node` from tests/browser (its node_modules); `js browser`: a browser SDK's
  `AnalyticsBrowser.load`, run in a page in headless Chromium. Each runs against relay as a real
  process whose upstream is a fake vendor, and the one track it sends, `Signed Up`, must reach
  the vendor.
- `nginx`: a `location` block, put in a server of a real nginx in front of relay; a browser call
  through it must reach the vendor with the client address nginx passed on.
- `sh`: each command is either run here (the `relay` commands that change nothing) or listed in
  NOT_RUN with the reason; any other command fails.

What a snippet addresses is swapped for the test's own before it runs: `http://relay:8080` (the
SDK snippets), `t.example.com` (the browser snippets) and `http://127.0.0.1:8080` (nginx) for the
relay started here, `YOUR_WRITE_KEY` for a test key, and a browser snippet's `protocol: 'https'`
for `'http'`. A snippet without these placeholders fails rather than reach a real vendor.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fakes import FakeUpstream, Reply, free_port
from processes import RelayProcess, clean_env
from system.test_browser import CHROMIUM, MODULES, SDKS, drive, serve_page

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHIPPED = ROOT / "config" / "relay.yaml"
BIN = Path(sys.executable).parent  # the venv's bin: `relay` and this Python
KEY = "wk_docs_snippet"
RELAY_PLACEHOLDER = "http://relay:8080"
KEY_PLACEHOLDER = "YOUR_WRITE_KEY"
# What the configs read from the environment beyond the shipped defaults: a staff domain (else
# the shipped rules warn of the placeholder), the `hash` rule's key, and the Redis of `state`.
CHECK_ENV = {"RELAY_STAFF_DOMAIN": "acme.io", "RELAY_HASH_KEY": "docs-snippet-hash-key-1234",
             "REDIS_URL": "redis://127.0.0.1:6379/0"}
NODE_SDKS = ["@segment/analytics-node", "@rudderstack/rudder-sdk-node", "@june-so/analytics-node"]
# A Python SDK's module -> the upstream kind of its vendor.
PYTHON_KINDS = {"segment.analytics": "segment", "june": "june",
                "rudderstack.analytics": "rudderstack"}
NODE_KINDS = {"@segment/analytics-node": "segment", "@june-so/analytics-node": "june",
              "@rudderstack/rudder-sdk-node": "rudderstack"}
BATCH_PATHS = {"segment": "/v1/batch", "june": "/sdk/batch", "rudderstack": "/v1/batch"}
# What each kind of runnable block needs of this machine that may be missing, as a hint (or "").
NODE = shutil.which("node")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NODE_MISSING = ("node" if NODE is None else
                "" if all((MODULES / sdk).is_dir() for sdk in NODE_SDKS) else
                "the Node SDKs (npm ci --prefix tests/browser)")
BROWSER_MISSING = ("Chromium (apt-get install -y chromium) and node"
                   if not Path(CHROMIUM).exists() or NODE is None else
                   "" if (MODULES / "playwright-core").is_dir()
                   and all(p.is_dir() for p in SDKS.values()) else
                   "the browser SDKs and playwright-core (npm ci --prefix tests/browser)")
NGINX_MISSING = "" if Path(NGINX).exists() else "nginx (apt-get install -y nginx)"

# Shell commands run here: relay's, as long as they change nothing (an `echo ... |` may feed one).
RUN = re.compile(r"^(echo '[^']*' \| )?relay (check|--version|try)( |$)")
# Shell commands not run here, each with the reason, matched by their beginning.
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/relay serve":
        "installs relay over the .venv the tests run in and serves until stopped; the SDK "
        "snippets here run against `relay serve` of this checkout",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest":
        "the tests themselves: .ci/run runs this line as written, last",
    ".venv/bin/ruff check relay tests && .venv/bin/mypy":
        "lint and types: .ci/run runs both",
    "docker ":
        "needs a container engine: deploy/test-image builds and runs the image with podman "
        "(.ci/run runs it), and tests/system/test_container.py runs its command without one",
}


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts, its info string and its text (dedented)."""

    page: Path
    line: int
    lang: str
    qualifier: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>.*?)\s*$")


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order; an unclosed fence is an error."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, indent, fence = i + 1, len(opening["indent"]), opening["fence"]
        words = opening["info"].split(maxsplit=1)
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.name}:{len(lines)}: a fence is never closed")
        found.append(Block(page, start, words[0] if words else "",
                           words[1] if len(words) > 1 else "", "\n".join(body) + "\n"))
        i += 1
    return found


BLOCKS = [block for page in PAGES for block in read_blocks(page)]
KINDS = {("text", ""), ("yaml", ""), ("yaml", "prometheus"), ("python", ""), ("js", ""),
         ("js", "browser"), ("nginx", ""), ("sh", "")}


def of_kind(lang: str, qualifier: str = "") -> list[Block]:
    return [b for b in BLOCKS if (b.lang, b.qualifier) == (lang, qualifier)]


def unavailable(reason: str) -> None:
    """Skips the test for want of `reason`, except under CI, which must have it: there it fails."""
    if os.environ.get("CI"):
        pytest.fail(f"needs {reason}")
    pytest.skip(f"needs {reason}")


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def with_placeholders(block: Block, *placeholders: str) -> str:
    """The block's text, which must hold each placeholder (else it would reach a real host)."""
    for placeholder in placeholders:
        assert placeholder in block.text, f"{block}: the snippet does not use {placeholder!r}"
    return block.text


Serve = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
def serve(spawn_relay: Serve) -> Serve:
    """Starts relay as a real process on a free port with the given upstreams; killed after."""
    return spawn_relay


# An SDK that ignored the snippet's host would post to its vendor: the proxy the HTTP clients of
# the Python SDKs and of axios read from the environment is a closed port, so that it cannot.
NO_VENDOR = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
             "NO_PROXY": "127.0.0.1,localhost"}


async def run(argv: list[str], cwd: Path, seconds: float = 60.0) -> str:
    """Runs a child to its end; fails with its output unless it exits 0; returns that output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env={**clean_env(), **NO_VENDOR}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv[0]} did not finish within {seconds} s")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{text[-3000:]}"
    return text


async def assert_delivered(upstream: FakeUpstream, kind: str) -> list[dict[str, Any]]:
    """The snippet's event reached the vendor, sent with the snippet's key on the kind's path."""
    messages = await upstream.wait_for(1)
    assert [m["event"] for m in messages if m["type"] == "track"] == ["Signed Up"], messages
    for request in upstream.requests:
        assert request.path == BATCH_PATHS[kind]
        assert request.headers["Authorization"] == basic(KEY)
    return messages


def test_every_block_is_of_a_kind_this_test_runs():
    """Every fenced block of the README and docs/ has an info string this module knows how to
    run (or knows to leave, as `text`)."""
    assert len(PAGES) >= 8 and BLOCKS
    unknown = [f"{b}: ```{b.lang} {b.qualifier}".rstrip() for b in BLOCKS
               if (b.lang, b.qualifier) not in KINDS]
    assert unknown == [], "blocks of a kind tests/docs/test_snippets.py does not run: give " \
        "each a kind it runs, or `text` if nobody would copy it"


def merged(shipped: Any, fragment: Any) -> Any:
    """`fragment` over `shipped`: mappings merged key by key, anything else replaced."""
    if isinstance(shipped, dict) and isinstance(fragment, dict):
        return {**shipped, **{k: merged(shipped.get(k), v) for k, v in fragment.items()}}
    return fragment


@pytest.mark.parametrize("block", of_kind("yaml"), ids=str)
async def test_config_block_passes_relay_check(block: Block, tmp_path: Path):
    """A config block, whole or merged into the shipped config, passes `relay check` with no
    warning."""
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block}: a config block must be a mapping"
    path = tmp_path / "relay.yaml"
    if "upstreams" in data:
        path.write_text(block.text)
    else:
        path.write_text(yaml.safe_dump(merged(yaml.safe_load(SHIPPED.read_text()), data),
                                       sort_keys=False))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "relay"), "check", "--config", str(path), cwd=tmp_path,
        env={**clean_env(), **CHECK_ENV}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 0, f"{block}:\n{out}\n{path.read_text()}"
    assert "warning" not in out, f"{block}:\n{out}"


@pytest.mark.parametrize("block", of_kind("yaml", "prometheus"), ids=str)
async def test_alert_rules_name_metrics_relay_serves(block: Block, upstream: FakeUpstream,
                                                     serve: Serve):
    """Each example alert is a Prometheus rule whose `relay_*` metrics a running relay serves."""
    alerts = yaml.safe_load(block.text)
    assert isinstance(alerts, list) and alerts
    relay = await serve([{"name": "seg", "kind": "segment", "url": upstream.url}])
    async with aiohttp.ClientSession() as http:
        body = {"type": "track", "userId": "u1", "event": "Signed Up"}
        async with http.post(relay.url + "/v1/track", json=body,
                             headers={"Authorization": basic(KEY)}) as resp:
            assert resp.status == 200
        await upstream.wait_for(1)
        async with http.get(relay.url + "/metrics") as resp:
            exposition = await resp.text()
    served = set(re.findall(r"^(?:# (?:HELP|TYPE) )?(relay_\w+)", exposition, re.MULTILINE))
    for alert in alerts:
        assert {"alert", "expr"} <= set(alert), alert
        named = set(re.findall(r"\brelay_\w+", alert["expr"]))
        assert named and named <= served, f"{alert['alert']}: {named - served} not served"


def rudder_environment(folder: Path) -> str:
    """Makes `folder` a virtual environment with rudder-sdk-python as the `test-rudder` extra
    pins it, unless it is one already; returns what failed, or "". One pytest run at a time
    builds it (a lock beside it)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted: list[str] = pyproject["project"]["optional-dependencies"]["test-rudder"]
    python, stamp = folder / "bin" / "python", folder / "installed.json"
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
            return ""
        shutil.rmtree(folder, ignore_errors=True)
        for step in ([sys.executable, "-m", "venv", str(folder)],
                     [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      *wanted]):
            done = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                return (f"{' '.join(wanted)} in an environment of its own ({' '.join(step[:4])}"
                        f" failed: {done.stderr.strip()[-500:]})")
        stamp.write_text(json.dumps(wanted))
    return ""


async def rudder_python(request: pytest.FixtureRequest) -> Path:
    """A Python with rudder-sdk-python, in an environment of its own kept in pytest's cache (it
    cannot be installed beside june-analytics-python): built the first time, then reused."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    folder = (cache.mkdir("rudder-sdk-python") if cache is not None else
              request.getfixturevalue("tmp_path_factory").mktemp("rudder-sdk-python"))
    if failed := await asyncio.to_thread(rudder_environment, folder):
        unavailable(failed)
    return folder / "bin" / "python"


@pytest.mark.parametrize("block", of_kind("python"), ids=str)
async def test_python_sdk_snippet_delivers_through_relay(
        block: Block, request: pytest.FixtureRequest, upstream: FakeUpstream, serve: Serve,
        tmp_path: Path):
    """The Python SDK snippet, run as written, sends its event through relay to the vendor."""
    code = with_placeholders(block, RELAY_PLACEHOLDER, KEY_PLACEHOLDER)
    module = re.search(r"^(?:import|from) ([\w.]+)", code, re.MULTILINE)
    assert module and module[1] in PYTHON_KINDS, f"{block}: which SDK is this?"
    kind = PYTHON_KINDS[module[1]]
    python = await rudder_python(request) if kind == "rudderstack" else Path(sys.executable)
    relay = await serve([{"name": "vendor", "kind": kind, "url": upstream.url}])
    await run([str(python), "-c", code.replace(RELAY_PLACEHOLDER, relay.url)
               .replace(KEY_PLACEHOLDER, KEY)], cwd=tmp_path)
    await assert_delivered(upstream, kind)


@pytest.mark.parametrize("block", of_kind("js"), ids=str)
async def test_node_sdk_snippet_delivers_through_relay(block: Block, upstream: FakeUpstream,
                                                       serve: Serve):
    """The Node SDK snippet, run by node as an ES module, sends its event through relay to the
    vendor."""
    if NODE_MISSING:
        unavailable(NODE_MISSING)
    code = with_placeholders(block, RELAY_PLACEHOLDER, KEY_PLACEHOLDER)
    package = re.search(r"^import .* from '([^']+)'", code, re.MULTILINE)
    assert package and package[1] in NODE_KINDS, f"{block}: which SDK is this?"
    kind = NODE_KINDS[package[1]]
    relay = await serve([{"name": "vendor", "kind": kind, "url": upstream.url}])
    await run(["node", "--input-type=module", "-e",
               code.replace(RELAY_PLACEHOLDER, relay.url).replace(KEY_PLACEHOLDER, KEY)],
              cwd=MODULES.parent)
    await assert_delivered(upstream, kind)


# The page a browser snippet runs in: the SDK's bundle, then the snippet's `AnalyticsBrowser.load`
# as written, then one track. A snippet that brings no settings (neither `cdnSettings` nor
# `cdnURL`) gets them inline, as tests/system/test_browser.py's pages do: no CDN is reachable here.
PAGE = """<!doctype html><html><head><title>relay docs snippet</title></head><body>
<script src="/sdk/index.js"></script>
<script>
const AnalyticsBrowser = {{
  load: (settings, options) => window.AnalyticsNext.AnalyticsBrowser.load(
    settings.cdnSettings || settings.cdnURL ? settings : {{ ...settings, cdnSettings: {inline} }},
    options),
}}
Promise.resolve(
{snippet}
).then(async ([analytics]) => {{
  await analytics.track('Signed Up')
  window.__done = true
}}).catch((err) => {{ window.__error = String(err && err.stack || err) }})
</script></body></html>"""


@pytest.mark.parametrize("block", of_kind("js", "browser"), ids=str)
async def test_browser_snippet_delivers_through_relay(block: Block, upstream: FakeUpstream,
                                                      serve: Serve):
    """The browser snippet, loaded in a page of another origin in headless Chromium, sends its
    event through relay to the vendor (its settings from relay when it names relay as its CDN)."""
    if BROWSER_MISSING:
        unavailable(BROWSER_MISSING)
    code = with_placeholders(block, "t.example.com", KEY_PLACEHOLDER).strip().rstrip(";")
    sdk = "june" if "'june.so'" in code else "segment"
    # The CDN relay fetches the settings from when a page asks relay for them: a fake vendor
    # answering every request with settings that point the SDK elsewhere, which relay rewrites.
    cdn = FakeUpstream()
    cdn.default = Reply(body=json.dumps({"integrations": {"Segment.io": {
        "apiKey": KEY, "apiHost": "api.segment.io/v1"}}}))
    await cdn.start()
    try:
        relay = await serve([{"name": "vendor", "kind": "segment", "url": upstream.url,
                              "cdn_url": cdn.url}])
        host = relay.url.removeprefix("http://")
        snippet = (code.replace("https://t.example.com", relay.url).replace("t.example.com", host)
                   .replace("protocol: 'https'", "protocol: 'http'").replace(KEY_PLACEHOLDER, KEY))
        inline = json.dumps({"integrations": {"Segment.io": {"apiKey": KEY}}})
        async for url in serve_page(sdk, host, PAGE.format(inline=inline, snippet=snippet)):
            result = await drive(url)
        assert result["done"], result
        [message] = await upstream.wait_for(1)
    finally:
        await cdn.stop()
    assert message["event"] == "Signed Up"
    assert message["context"]["library"]["name"] == "analytics.js"
    assert message["context"]["ip"] == "127.0.0.1"
    if "cdnURL" in code:
        assert [r.path for r in cdn.requests] == [f"/v1/projects/{KEY}/settings"]


NGINX_CONF = """daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log stderr;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
{block}
  }}
}}
"""


async def wait_listening(port: int, proc: asyncio.subprocess.Process, log: Path,
                         seconds: float = 10.0) -> None:
    """Waits until 127.0.0.1:port accepts a connection; fails if `proc` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            pytest.fail(f"nginx exited {proc.returncode}:\n{output}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    pytest.fail(f"nothing listens on {port} after {seconds} s")


@pytest.mark.parametrize("block", of_kind("nginx"), ids=str)
async def test_nginx_block_passes_the_client_address_to_relay(
        block: Block, upstream: FakeUpstream, serve: Serve, tmp_path: Path):
    """Behind a real nginx with the block as written, a browser call reaches the vendor with the
    address nginx saw it come from, not the one the client claimed."""
    if NGINX_MISSING:
        unavailable(NGINX_MISSING)
    text = with_placeholders(block, "http://127.0.0.1:8080")
    relay = await serve([{"name": "vendor", "kind": "segment", "url": upstream.url}],
                        trusted_proxies=["127.0.0.1"])
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port, block=text.replace(
        "http://127.0.0.1:8080", relay.url)))
    log = tmp_path / "nginx.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        await wait_listening(port, proc, log)
        # The client connects from 127.0.0.2 (nginx and relay see each other at 127.0.0.1) and
        # claims to forward for 203.0.113.7.
        body = {"type": "track", "userId": "u1", "event": "Signed Up", "writeKey": KEY}
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as http, http.post(
                f"http://127.0.0.1:{port}/v1/t", data=json.dumps(body),
                headers={"Content-Type": "text/plain", "X-Forwarded-For": "203.0.113.7"}) as resp:
            assert resp.status == 200, await resp.text()
        [message] = await upstream.wait_for(1)
    finally:
        proc.kill()  # by its pid; nginx runs as one process (master_process off)
        await proc.wait()
    # nginx appended the address it saw to the client's claim: relay, trusting 127.0.0.1 only,
    # takes the right-most address that is not a proxy's.
    assert message["context"]["ip"] == "127.0.0.2"


def commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, blank lines and comments left out."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("block", of_kind("sh"), ids=str)
async def test_shell_block_runs_or_says_why_not(block: Block, tmp_path: Path):
    """Each command of a shell block either runs here and exits 0, or is one NOT_RUN gives a
    reason for."""
    for command in commands(block):
        if any(command.startswith(known) for known in NOT_RUN):
            continue
        assert RUN.match(command), f"{block}: {command!r} is neither run here nor in NOT_RUN"
        # From the checkout (the shipped config), with relay's file in tmp_path.
        env = {**clean_env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "RELAY_DB": str(tmp_path / "relay.db")}
        done = await asyncio.to_thread(subprocess.run, ["bash", "-c", command], cwd=ROOT,
                                       env=env, capture_output=True, text=True, timeout=60,
                                       check=False)
        assert done.returncode == 0, f"{block}: {command}\n{done.stdout}{done.stderr}"
