"""Starting and stopping what the benchmark measures, each as a process of its own on 127.0.0.1.

`Procs` owns every child process (services and load generators alike); `Procs.stop_all` ends
them all, SIGTERM first and SIGKILL after a few seconds, and runs from a `finally`, so an error
or Ctrl-C leaves nothing behind. Each child gets its own session, so a Ctrl-C at the terminal
reaches only the harness, which then stops the children in order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_SECONDS = 20.0
WRITE_KEY = "bench-write-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    """One child process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Procs:
    """Every process the harness started, stopped in reverse order by `stop_all`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, seconds: float = 8.0) -> None:
        """SIGTERM, then SIGKILL to its process group (nginx's workers too) if it lingers."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def wait_port(proc: Proc, port: int, seconds: float = START_SECONDS) -> None:
    """Returns once `port` accepts connections; raises with the process's log if it died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {seconds}s:\n{proc.tail()}")


def python_server(procs: Procs, kind: str, port: int, *extra: str) -> Proc:
    """One of bench/servers.py's servers."""
    proc = procs.start(kind, [sys.executable, "-m", "bench.servers", kind, "--port", str(port),
                              *extra])
    return proc


def relay_config(workdir: Path, port: int, vendor_port: int) -> Path:
    """config/relay.yaml with its rules as shipped, listening on `port`, durable storage in a
    fresh file, and the one upstream pointed at the fake vendor.

    Backoff is capped at 1 s (shipped: 60 s) so that the outage scenarios time the drain rather
    than the last backoff wait; shutdown grace is 1 s so that stopping relay is quick."""
    shipped: dict[str, Any] = yaml.safe_load((ROOT / "config" / "relay.yaml").read_text())
    upstream = dict(shipped["upstreams"][0])
    upstream.update(url=f"http://{HOST}:{vendor_port}", write_key="",
                    backoff_initial_seconds=0.1, backoff_max_seconds=1.0)
    config = {**shipped, "listen": f"{HOST}:{port}", "shutdown_grace_seconds": 1,
              "storage": {**shipped["storage"], "path": str(workdir / "relay.db"),
                          "synchronous": "full"},
              "upstreams": [upstream]}
    path = workdir / "relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_relay(procs: Procs, workdir: Path, port: int, vendor_port: int) -> Proc:
    config = relay_config(workdir, port, vendor_port)
    proc = procs.start("relay", [sys.executable, "-m", "relay", "serve", "--config", str(config)],
                       env={"RELAY_LOG_LEVEL": "WARNING"})
    wait_port(proc, port)
    return proc


def nginx_binary(install: bool) -> str | None:
    """nginx's path; installs Debian's package first when allowed and it is missing."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found or not install:
        return found
    apt_install("nginx")
    return shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin")


def apt_install(package: str) -> None:
    """`apt-get install -y PACKAGE` as root, bounded; an update first if the lists are empty."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    print(f"bench: installing {package} from Debian (apt-get)", flush=True)
    install = ["apt-get", "install", "-y", "-q", package]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        if _quiet(install) != 0:
            _quiet(["apt-get", "update", "-q"])
            _quiet(install)


def _quiet(argv: list[str]) -> int:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(argv, env=env, timeout=300, check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return done.returncode


NGINX_CONF = """\
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream vendor {{ server {host}:{vendor}; keepalive 64; }}
    server {{
        listen {host}:{port};
        client_max_body_size 1m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://vendor;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(procs: Procs, binary: str, port: int, vendor_port: int) -> Proc:
    """nginx in the foreground with its own conf, pid, logs and temp files in a temp dir."""
    folder = procs.workdir / "nginx"
    folder.mkdir()
    folder.chmod(0o777)  # its workers may run as nobody
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=folder, host=HOST, vendor=vendor_port, port=port))
    proc = procs.start("nginx", [binary, "-p", str(folder), "-c", str(conf)])
    wait_port(proc, port)
    return proc


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def tree_rss_kb(pid: int) -> dict[str, int]:
    """`rss_kb` summed over a process and its children (peaks summed: an upper bound)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    total = rss_kb(pid)
    for child in children:
        try:
            for key, value in rss_kb(int(child)).items():
                total[key] = total.get(key, 0) + value
        except OSError:  # ended meanwhile
            continue
    return total
