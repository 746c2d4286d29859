"""Load from wrk (Debian's package), with a Lua script giving every message a unique messageId.

The script counts the answers by status in a `response` hook and prints one JSON line from
`done`, so the harness knows how many requests were answered 200 (and so how many messages the
vendor must get) without reading wrk's text summary.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from pathlib import Path

from bench.loads import AUTH, USERS, RunResult, Shape
from bench.services import Procs, apt_install

THREADS = 2
TIMEOUT = "10s"

SCRIPT = r"""
-- Unique messageIds: {tag}-w{thread}x{counter}-{i}; the B2B mix of bench/loads.py.
local tag, path, per = "x", "/v1/track", 1
local counter = 0
local threads = {}
ok, bad = 0, 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  tag, path, per = args[1], args[2], tonumber(args[3])
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "@AUTH@"
end

local TRACK = '{%s"userId":"user-%d","event":"Report Viewed","messageId":"%s",'
  .. '"timestamp":"%s","properties":{"report":"weekly","rows":%d},'
  .. '"context":{"library":{"name":"analytics-python","version":"2.4.0"}}%s}'
local IDENTIFY = '{"type":"identify","userId":"user-%d","messageId":"%s","timestamp":"%s",'
  .. '"traits":{"email":"user-%d@customer.example","created_at":"2024-01-01"}}'
local GROUP = '{"type":"group","userId":"user-%d","messageId":"%s","timestamp":"%s",'
  .. '"groupId":"company-%d"}'

-- Times as the SDKs write them (UTC, milliseconds, Z): the batch's sentAt is now, and each
-- message's timestamp its own, in the minute before (as bench/loads.py makes them). The
-- seconds' text is made once per second, not per message.
local second, seconds = -1, {}
local function clock()
  local now = os.time()
  if now ~= second then
    second = now
    for back = 0, 60 do seconds[back] = os.date("!%Y-%m-%dT%H:%M:%S", now - back) end
  end
end
local function event_time(n)
  return string.format("%s.%03dZ", seconds[1 + n % 60], n % 1000)
end

local function message(n, id, typed)
  local u = n % @USERS@
  if typed and n % 50 == 0 then return string.format(IDENTIFY, u, id, event_time(n), u) end
  if typed and n % 20 == 0 then return string.format(GROUP, u, id, event_time(n), n % 7) end
  local sent = typed and "" or string.format(',"sentAt":"%s.000Z"', seconds[0])
  return string.format(TRACK, typed and '"type":"track",' or '', u, id, event_time(n), n, sent)
end

function request()
  counter = counter + 1
  clock()
  local prefix = tag .. "-w" .. tid .. "x" .. counter .. "-"
  local n = counter * 7919 + tid
  if per == 1 and path == "/v1/track" then
    return wrk.format("POST", path, nil, message(n, prefix .. "0", false))
  end
  local parts = {}
  for i = 1, per do parts[i] = message(n * per + i, prefix .. (i - 1), true) end
  return wrk.format("POST", path, nil, '{"batch":[' .. table.concat(parts, ",")
    .. '],"sentAt":"' .. seconds[0] .. '.000Z"}')
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else bad = bad + 1 end
end

function done(summary, latency, requests)
  local okt, badt = 0, 0
  for _, t in ipairs(threads) do okt = okt + t:get("ok"); badt = badt + t:get("bad") end
  local e = summary.errors
  io.write(string.format('BENCH {"ok": %d, "non200": %d, "requests": %d, "duration_us": %d, '
    .. '"errors": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n', okt, badt,
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# For the latency scenario: each connection waits about `pause` ms after an answer before its
# next request, so 64 connections hold about 64000 / pause requests/s (less the latencies
# themselves) while wrk, not a Python generator, does the timing. The wait is drawn between
# half and one and a half times `pause`: equal waits would keep connections answered by the
# same group commit in lockstep, arriving in bursts of 64.
PACED = """
local pause = 0
local paced_init = init
function init(args)
  paced_init(args)
  pause = tonumber(args[4])
end
function delay() return math.floor(pause * (0.5 + math.random())) end
"""


def binary(install: bool) -> str | None:
    """wrk's path; Debian's package is installed first when allowed and it is missing."""
    found = shutil.which("wrk")
    if found is None and install:
        apt_install("wrk")
        found = shutil.which("wrk")
    return found


def script(workdir: Path, paced: bool = False) -> Path:
    path = workdir / ("bench-paced.lua" if paced else "bench.lua")
    text = SCRIPT.replace("@AUTH@", AUTH).replace("@USERS@", str(USERS))
    path.write_text(text + (PACED if paced else ""))
    return path


async def run(procs: Procs, wrk: str, target: str, url: str, *, shape: Shape, tag: str,
              seconds: float, connections: int, rate: float | None = None) -> RunResult:
    """One wrk run of `seconds` against `url`, as fast as it goes or, with `rate`, paced to
    about that many requests/s; its figures as a RunResult."""
    lua = script(procs.workdir, paced=rate is not None)
    threads = min(THREADS, connections)
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(round(seconds), 1)}s",
            f"--timeout={TIMEOUT}", "-s", str(lua), url, "--", tag, shape.path,
            str(shape.per_request)]
    if rate is not None:
        argv.append(str(max(round(connections * 1000 / rate), 1)))
    proc = procs.start(f"wrk-{tag}", argv)
    try:
        await asyncio.to_thread(proc.popen.wait, seconds + 60)
    except subprocess.TimeoutExpired:
        proc.popen.send_signal(signal.SIGINT)
        raise RuntimeError(f"wrk against {target} did not finish:\n{proc.tail()}") from None
    finally:
        procs.stop(proc)
    return parse(target, shape, tag, proc.log.read_text(errors="replace"))


def parse(target: str, shape: Shape, tag: str, output: str) -> RunResult:
    for line in output.splitlines():
        if line.startswith("BENCH "):
            got = json.loads(line[6:])
            return RunResult(target, shape.per_request, got["duration_us"] / 1e6, got["ok"],
                             got["non200"], got["errors"], got["p50_us"] / 1e6,
                             got["p99_us"] / 1e6, got["max_us"] / 1e6, tag)
    raise RuntimeError(f"wrk printed no result against {target}:\n{output[-2000:]}")
