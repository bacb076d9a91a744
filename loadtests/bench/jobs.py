"""Job-queue benchmark: how fast offloaded requests are enqueued and completed.

An instant origin (nginx, 1 worker, `return 200` of a small JSON) stands behind a sidecar
(`sidecar run`, 1 worker, access log off) with two routes to it: `/job`, offloaded
(`offload: {queue: bench}`, `queues.bench.concurrency` --concurrency, 32) and `/direct`,
proxied as usual. wrk (1 thread, --connections 32 keep-alive connections, a Lua script that
POSTs a 195-byte JSON body and counts the statuses) loads it for --duration seconds (5) per
case after a 1-2 s warm-up:
  direct             POST /direct: the reference, what proxying the same request costs
  1 process          POST /job; the sidecar's own job workers (`jobs.workers: true`, the
                     default) run the jobs while it takes the requests
  run + worker       the same sidecar plus one `sidecar worker` process: two processes share
                     the queue (the cluster-wide concurrency still 32)
  enqueue only       POST /job to a sidecar with `jobs.workers: false` and no worker: what a
                     front instance that only enqueues takes (its jobs are never run)
For each job case it prints jobs/s enqueued (202s per second while wrk runs), the enqueue
latency p50 / p99 / max (POST to 202, from wrk), and, once `/admin/stats` shows the queue empty
(`jobs.queues.bench`: nothing queued, running or waiting for a retry, and `outcomes.succeeded`
steady), jobs/s completed: the jobs over the time from the first POST to the last one counted
`succeeded` (stats polled every 50 ms), the time to drain after the last 202 and the drain rate
(jobs/s completed once the POSTs stopped). nginx counts the upstream calls (`stub_status`):
one per job. Then one client (wrk with 1 connection, --duration seconds): POST /direct and POST
/job (the sidecar's own workers), requests/s, latency p50 / p99 and the sidecar's CPU time per
request (from /proc, the jobs' runs included): what a lone request and a light load cost.
Before measuring, one job is followed through the public API (202, `Location`,
`GET /_sidecar/jobs/{id}` until `succeeded`, its `/result`).

The sidecars and redis-server run on core 0 (`taskset -c 0`); wrk, nginx, the extra worker and
this script on core 1. Exits 2 when the harness fails: an answer other than 202 (200 for
/direct), a socket error, a job failed or retried, jobs not all done within --timeout, fewer
upstream calls than jobs. Needs wrk, nginx (`make bench-jobs` installs both) and redis-server
(`make setup`). Every process it starts is stopped on exit, on error and on Ctrl-C.

    .venv/bin/python loadtests/bench/jobs.py [--duration 5] [--connections 32]
        [--concurrency 32] [--timeout 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    HarnessError,
    child,
    die_with_parent,
    free_port,
    http_get,
    loadavg,
    log_on_failure,
    nginx,
    on_signal,
    redis_server,
    sidecar_cpu,
    sidecar_process,
    tail,
    wait_for_port,
    which,
)

QUEUE = "bench"
BODY = json.dumps({"report": "monthly", "filler": "x" * 160}).encode()
ORIGIN_BODY = b'{"ok":true}\n'
POLL_S = 0.05  # /admin/stats while a queue drains
STEADY_S = 0.3  # the queue empty and the succeeded count unchanged this long: drained
WARMUP_S = 1.0  # a job case's warm-up (then drained before measuring)

# wrk: POST the body; every response's status is checked (`expected`, the script's argument);
# one RESULT line at the end: responses, wrong statuses, socket errors, seconds, latency p50,
# p99, max in ms. One thread: the counters of setup()'s thread are the whole run's.
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = @BODY@
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) seen = 0; wrong = 0; expected = tonumber(args[1]) end
function response(status, headers, body)
  seen = seen + 1
  if status ~= expected then wrong = wrong + 1 end
end
function done(summary, latency, requests)
  local seen, wrong = 0, 0
  for _, t in ipairs(threads) do seen = seen + t:get("seen"); wrong = wrong + t:get("wrong") end
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %.6f %.3f %.3f %.3f\n", seen, wrong,
    e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
""".replace("@BODY@", json.dumps(BODY.decode()))


@dataclass
class Load:
    """One wrk run."""

    responses: int
    wrong_status: int
    socket_errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.responses / self.seconds


def load(script: Path, port: int, path: str, duration: float, connections: int,
         expected: int) -> Load:
    """wrk on core 1 for `duration` seconds; HarnessError on a wrong status or socket error."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "-s",
         str(script), f"http://127.0.0.1:{port}{path}", "--", str(expected)],
        check=True, capture_output=True, text=True, preexec_fn=die_with_parent).stdout
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise HarnessError(f"could not read wrk's output for POST {path}:\n{out}")
    parts = line.split()
    result = Load(int(parts[1]), int(parts[2]), int(parts[3]),
                  *(float(x) for x in parts[4:8]))
    if result.wrong_status or result.socket_errors or not result.responses:
        raise HarnessError(f"POST {path}: {result.wrong_status} of {result.responses} answers "
                           f"were not {expected}, {result.socket_errors} socket errors")
    return result


# --- the servers -------------------------------------------------------------------------------


def origin_block(port: int) -> str:
    """nginx answering any request at once; /_nginx counts the requests served."""
    return (f"  server {{ listen 127.0.0.1:{port} backlog=1024; keepalive_requests 1000000;\n"
            f"    location / {{ default_type application/json;"
            f" return 200 '{ORIGIN_BODY.decode().strip()}\\n'; }}\n"
            f"    location = /_nginx {{ stub_status; }} }}")


def origin_requests(port: int) -> int:
    """Requests nginx has served, this one included."""
    # stub_status: "Active connections: N\nserver accepts handled requests\n A H R\n..."
    return int(http_get(port, "/_nginx")[2].split(b"\n")[2].split()[2])


def sidecar_config(workdir: Path, name: str, port: int, admin: int, redis: int, origin: int,
                   concurrency: int, workers: bool) -> dict[str, Any]:
    return {
        "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
                   "workers": 1, "watch_config": False,
                   "state_dir": str(workdir / f"{name}-state")},
        "redis": {"url": f"redis://127.0.0.1:{redis}/0"},
        "upstreams": {"origin": {"url": f"http://127.0.0.1:{origin}"}},
        "log": {"access": False},
        "queues": {QUEUE: {"concurrency": concurrency}},
        "jobs": {"workers": workers},
        "routes": [
            {"name": "job", "match": {"path": "/job"}, "upstream": "origin",
             "offload": {"queue": QUEUE}},
            {"name": "direct", "match": {"path": "/**"}, "upstream": "origin"},
        ],
    }


@contextmanager
def job_worker(workdir: Path, name: str, config: dict[str, Any], core: int) -> Iterator[None]:
    """`python -m sidecar worker` pinned to `core`, until it says it runs."""
    conf = workdir / f"{name}.yaml"
    conf.write_text(json.dumps(config))
    log = workdir / f"{name}.log"
    with child(["taskset", "-c", str(core), sys.executable, "-m", "sidecar", "worker", "-c",
                str(conf)], log):
        deadline = time.monotonic() + 15
        while "sidecar worker running" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise HarnessError(f"{name} did not start within 15 s\n--- {log.name}:\n"
                                   f"{tail(log)}")
            time.sleep(0.05)
        yield


def queue_stats(admin: int) -> dict[str, Any]:
    stats = json.loads(http_get(admin, "/admin/stats")[2])["jobs"]
    if "error" in stats:
        raise HarnessError(f"/admin/stats: {stats['error']}")
    queue: dict[str, Any] = stats["queues"][QUEUE]
    return queue


def request(port: int, method: str, path: str,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def follow_one_job(port: int, run: bool) -> str:
    """POST one job and follow it through the public API (`run`: until it succeeded and its
    result is the origin's answer); returns its id."""
    status, headers, body = request(port, "POST", "/job", BODY)
    location = headers.get("location", "")
    if status != 202 or not location.startswith("/_sidecar/jobs/"):
        raise HarnessError(f"POST /job: {status}, Location {location!r}: {body[:200]!r}")
    deadline = time.monotonic() + 10
    while True:
        status, _, body = request(port, "GET", location)
        state = json.loads(body).get("status") if status == 200 else None
        if state == "succeeded" or (not run and state == "queued"):
            break
        if time.monotonic() > deadline or state in ("failed", "cancelled"):
            raise HarnessError(f"GET {location}: {status} {body[:300]!r}")
        time.sleep(0.05)
    if run:
        status, _, body = request(port, "GET", location + "/result")
        if status != 200 or body != ORIGIN_BODY:
            raise HarnessError(f"GET {location}/result: {status} {body[:200]!r}")
    return location.rsplit("/", 1)[1]


# --- the cases ---------------------------------------------------------------------------------


@dataclass
class OneClient:
    """One connection, one request at a time: the latency of a lone request and what the
    sidecar spends on each (its CPU time over the run, the jobs' own runs included)."""

    case: str
    requests: int
    per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float


def one_client(name: str, script: Path, port: int, admin: int, path: str, expected: int,
               args: argparse.Namespace) -> OneClient:
    cpu_before = sidecar_cpu(admin)
    before = queue_stats(admin)["outcomes"]["succeeded"]
    result = load(script, port, path, args.duration, 1, expected)
    if path == "/job":  # its jobs' runs count too
        drain(admin, before, result.responses, args.timeout)
    cpu_after = sidecar_cpu(admin)
    return OneClient(name, result.responses, round(result.rate, 1), result.p50_ms,
                     result.p99_ms, round((cpu_after - cpu_before) * 1000 / result.responses, 3))


@dataclass
class JobCase:
    case: str
    jobs: int  # POSTs answered 202 and queued, counted `succeeded` once the queue drained
    enqueued_per_s: float
    enqueue_p50_ms: float
    enqueue_p99_ms: float
    enqueue_max_ms: float
    enqueue_s: float
    done_during_enqueue: int  # succeeded by the time wrk stopped
    completed_per_s: float | None  # jobs / (first POST -> last succeeded); None: not run
    drained_after_s: float | None  # last 202 -> last succeeded
    drain_per_s: float | None  # jobs completed after the last 202, per second
    upstream_calls: int | None


def drain(admin: int, before: int, at_least: int, timeout: float) -> tuple[int, float]:
    """Polls the queue until it is empty and `succeeded` stays unchanged for STEADY_S: the jobs
    succeeded since `before`, and when the last of them was seen."""
    deadline = time.monotonic() + timeout
    done, changed = -1, time.monotonic()
    while True:
        stats = queue_stats(admin)
        now = time.monotonic()
        outcomes = stats["outcomes"]
        if outcomes["failed"] or outcomes["retried"] or outcomes["requeued"]:
            raise HarnessError(f"jobs failed or were retried: {outcomes}")
        if outcomes["succeeded"] - before != done:
            done, changed = outcomes["succeeded"] - before, now
        empty = not (stats["queued"] or stats["running"] or stats["waiting_retry"])
        if empty and done >= at_least and now - changed >= STEADY_S:
            return done, changed
        if now > deadline:
            raise HarnessError(f"{done} jobs succeeded, at least {at_least} expected, after "
                               f"{timeout:g} s; queue: {json.dumps(stats)}")
        time.sleep(POLL_S)


def job_case(name: str, script: Path, port: int, admin: int, origin: int,
             args: argparse.Namespace, run: bool) -> JobCase:
    """Warm-up (drained), then --duration seconds of POSTs, then (`run`) until drained."""
    load(script, port, "/job", WARMUP_S, args.connections, 202)
    if run:
        drain(admin, queue_stats(admin)["outcomes"]["succeeded"], 0, args.timeout)
    before = queue_stats(admin)
    queued_before = before["queued"]
    calls_before = origin_requests(origin)
    started = time.monotonic()
    result = load(script, port, "/job", args.duration, args.connections, 202)
    stopped = time.monotonic()
    during = queue_stats(admin)["outcomes"]["succeeded"] - before["outcomes"]["succeeded"]
    row = JobCase(name, result.responses, round(result.rate, 1), result.p50_ms,
                  result.p99_ms, result.max_ms, round(result.seconds, 2), during,
                  None, None, None, None)
    if not run:
        # Nothing runs them: the queue grew by the 202s (and by up to one request per
        # connection that was in flight when wrk stopped).
        row.jobs = queue_stats(admin)["queued"] - queued_before
        if not result.responses <= row.jobs <= result.responses + args.connections:
            raise HarnessError(f"{name}: {row.jobs} jobs queued for {result.responses} 202s")
        return row
    jobs, last = drain(admin, before["outcomes"]["succeeded"], result.responses, args.timeout)
    if jobs > result.responses + args.connections:
        raise HarnessError(f"{name}: {jobs} jobs succeeded for {result.responses} 202s")
    row.jobs = jobs
    row.completed_per_s = round(jobs / (last - started), 1)
    row.drained_after_s = round(last - stopped, 2)
    row.drain_per_s = round((jobs - during) / (last - stopped), 1) if last > stopped else None
    row.upstream_calls = origin_requests(origin) - calls_before - 1  # the second look
    if row.upstream_calls < jobs:
        raise HarnessError(f"{name}: {jobs} jobs succeeded but the origin served "
                           f"{row.upstream_calls} requests")
    return row


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace,
        redis_bin: str) -> tuple[Load, list[OneClient], list[JobCase]]:
    rows: list[JobCase] = []
    single: list[OneClient] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-jobs-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as nobody
        (workdir / "tmp").mkdir()
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        origin, redis = free_port(), free_port()
        stack.enter_context(nginx(workdir, "origin", origin_block(origin), core=1))
        with log_on_failure("nginx", workdir / "origin.error.log"):
            wait_for_port(origin)
        with log_on_failure("redis-server", workdir / "redis.log"):
            stack.enter_context(redis_server(redis_bin, workdir, redis, core=0))

        with ExitStack() as running:
            port, admin = free_port(), free_port()
            config = sidecar_config(workdir, "sidecar", port, admin, redis, origin,
                                    args.concurrency, workers=True)
            running.enter_context(log_on_failure("sidecar", workdir / "sidecar.log"))
            running.enter_context(sidecar_process(workdir, "sidecar", config, port))
            wait_for_port(admin)
            follow_one_job(port, run=True)

            load(script, port, "/direct", 2.0, args.connections, 200)  # warm-up
            direct = load(script, port, "/direct", args.duration, args.connections, 200)
            single.append(one_client("direct POST", script, port, admin, "/direct", 200, args))
            single.append(one_client("job (1 process)", script, port, admin, "/job", 202, args))
            rows.append(job_case("1 process", script, port, admin, origin, args, run=True))

            running.enter_context(job_worker(workdir, "worker", config, core=1))
            rows.append(job_case("run + worker", script, port, admin, origin, args, run=True))

        with ExitStack() as running:
            port, admin = free_port(), free_port()
            config = sidecar_config(workdir, "enqueuer", port, admin, redis, origin,
                                    args.concurrency, workers=False)
            running.enter_context(log_on_failure("enqueuer", workdir / "enqueuer.log"))
            running.enter_context(sidecar_process(workdir, "enqueuer", config, port))
            wait_for_port(admin)
            follow_one_job(port, run=False)
            rows.append(job_case("enqueue only", script, port, admin, origin, args, run=False))
    return direct, single, rows


# --- the report --------------------------------------------------------------------------------


def report(direct: Load, single: list[OneClient], rows: list[JobCase],
           args: argparse.Namespace, load_start: str, load_end: str) -> None:
    print(f"\njobs: POST of {len(BODY)} bytes, wrk {args.connections} connections, "
          f"{args.duration:g}s per case, queue concurrency {args.concurrency}; instant origin "
          "(nginx); sidecars + redis on core 0, wrk + origin + extra worker on core 1")
    print(f"load average: {load_start} before measuring, {load_end} at end")
    print(f"\n{'case':<15}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    print(f"{'direct POST':<15}{direct.rate:>9.0f}{direct.p50_ms:>9.2f}{direct.p99_ms:>9.2f}"
          f"{direct.max_ms:>9.2f}   ({direct.responses} requests, the reference)")
    print(f"\n{'case':<15}{'enqueued':>10}{'x direct':>10}{'enqueue ms':>22}{'jobs':>7}"
          f"{'completed':>11}{'drained':>9}{'drain':>9}{'upstream':>10}")
    print(f"{'':<15}{'jobs/s':>10}{'':>10}{'p50 / p99 / max':>22}{'':>7}{'jobs/s':>11}"
          f"{'after s':>9}{'jobs/s':>9}{'calls':>10}")
    for r in rows:
        latency = f"{r.enqueue_p50_ms:.1f} / {r.enqueue_p99_ms:.1f} / {r.enqueue_max_ms:.1f}"

        def cell(value: float | None, width: int, spec: str) -> str:
            return f"{'-' if value is None else format(value, spec):>{width}}"

        print(f"{r.case:<15}{r.enqueued_per_s:>10.0f}{r.enqueued_per_s / direct.rate:>10.2f}"
              f"{latency:>22}{r.jobs:>7}{cell(r.completed_per_s, 11, '.0f')}"
              f"{cell(r.drained_after_s, 9, '.2f')}{cell(r.drain_per_s, 9, '.0f')}"
              f"{cell(r.upstream_calls, 10, 'd')}")
    print("\ncompleted: jobs over first POST -> last succeeded; drained after: last 202 -> last "
          "succeeded; drain: jobs/s completed once the POSTs stopped. Enqueue only: "
          "`jobs.workers: false`, no worker (its jobs stay queued).")
    for r in rows:
        if r.completed_per_s is not None:
            print(f"{r.case}: {r.done_during_enqueue} of {r.jobs} jobs done while the POSTs "
                  f"ran ({r.done_during_enqueue / r.enqueue_s:.0f} jobs/s)")
    print(f"\none client (1 connection, {args.duration:g}s){'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'sidecar CPU ms':>16}")
    print(f"{'':<31}{'':>9}{'':>9}{'':>9}{'per request':>16}")
    for o in single:
        print(f"{o.case:<31}{o.per_s:>9.0f}{o.p50_ms:>9.2f}{o.p99_ms:>9.2f}"
              f"{o.cpu_ms_per_request:>16.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds of POSTs per case (5)")
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections, i.e. concurrent clients (32)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="queues.bench.concurrency: jobs running at once, cluster-wide (32)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds for a case's jobs to be done once the POSTs stop (120)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.duration <= 0 or args.connections < 1 or args.concurrency < 1:
        parser.error("needs --duration > 0, --connections >= 1, --concurrency >= 1")

    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: the sidecar on core 0, wrk on core 1", file=sys.stderr)
        return 2
    missing = [name for name, found in (
        ("wrk", which("wrk", "/usr/bin/wrk")), ("nginx", which("nginx", "/usr/sbin/nginx")),
        ("redis-server", which("redis-server", "/usr/bin/redis-server")))
        if found is None]
    if missing:
        print(f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)}; "
              "`make bench-jobs` installs them)", file=sys.stderr)
        return 2
    redis_bin = which("redis-server", "/usr/bin/redis-server")
    assert redis_bin is not None

    os.sched_setaffinity(0, {1})  # this script; the servers are started with taskset -c 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    print(f"load average before measuring: {load_start}", flush=True)
    try:
        direct, single, rows = run(args, redis_bin)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, ValueError, KeyError,
            subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    load_end = loadavg()
    report(direct, single, rows, args, load_start, load_end)
    if args.json:
        args.json.write_text(json.dumps({
            "direct": asdict(direct) | {"requests_per_s": round(direct.rate, 1)},
            "jobs": [asdict(r) for r in rows], "one_client": [asdict(o) for o in single],
            "body_bytes": len(BODY),
            "duration_s": args.duration, "connections": args.connections,
            "concurrency": args.concurrency, "loadavg_start": load_start,
            "loadavg_end": load_end}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
