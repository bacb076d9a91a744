"""Job throughput benchmark: how fast offloaded requests are enqueued and completed.

An instant origin (a tiny aiohttp app answering a small JSON) stands behind one sidecar with two
routes to it: `/job`, offloaded (202 + a job in the Redis queue, `queues.bench.concurrency`
--concurrency, 32), and `/direct`, proxied as usual. --clients (32) concurrent keep-alive
clients POST a 200-byte body, --jobs (3000) requests per case:
  direct             POST /direct: the reference, what proxying the same call costs
  in-process         POST /job; the sidecar's own job workers run the jobs
  separate worker    POST /job to a sidecar with `jobs.workers: false`; one `sidecar worker`
                     process (on the other core) runs them
For the job cases it prints jobs/s enqueued (202s per second while the clients run), the
enqueue latency p50 / p99 / max (POST to 202), and jobs/s completed: the jobs over the time
from the first POST to the last job reaching `succeeded` (read from /admin/stats).

The sidecar and redis-server run on core 0, this script (the clients) and the origin on core 1,
the separate worker on core 1 too. Exits 2 when the harness fails (an answer other than 202 or
200, jobs not all done within --timeout). It needs redis-server (`make setup` installs it).
Every process it starts is stopped on exit, on error and on Ctrl-C.

    .venv/bin/python loadtests/bench/jobs.py [--jobs 3000] [--clients 32] [--concurrency 32]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    HarnessError,
    child,
    free_port,
    http_get,
    loadavg,
    log_on_failure,
    redis_server,
    stop,
    wait_for_port,
    which,
)

BODY = json.dumps({"report": "monthly", "filler": "x" * 160}).encode()

ORIGIN = """
import sys
from aiohttp import web

async def answer(request):
    await request.read()
    return web.json_response({"ok": True})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def sidecar_config(workdir: Path, port: int, admin: int, redis: int, origin: int,
                   concurrency: int, workers: bool) -> dict[str, Any]:
    return {
        "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
                   "workers": 1, "watch_config": False, "state_dir": str(workdir / "state")},
        "redis": {"url": f"redis://127.0.0.1:{redis}/0"},
        "upstreams": {"origin": {"url": f"http://127.0.0.1:{origin}"}},
        "log": {"access": False},
        "queues": {"bench": {"concurrency": concurrency}},
        "jobs": {"workers": workers},
        "routes": [
            {"name": "job", "match": {"path": "/job"}, "upstream": "origin",
             "offload": {"queue": "bench"}},
            {"name": "direct", "match": {"path": "/**"}, "upstream": "origin"},
        ],
    }


@contextmanager
def sidecar(workdir: Path, name: str, command: str, config: dict[str, Any], core: int,
            port: int | None) -> Any:
    conf = workdir / f"{name}.yaml"
    conf.write_text(json.dumps(config))
    log = workdir / f"{name}.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            ["taskset", "-c", str(core), sys.executable, "-m", "sidecar", command, "-c",
             str(conf)], stdout=subprocess.DEVNULL, stderr=err, cwd=workdir)
    try:
        with log_on_failure(name, log):
            if port is not None:
                wait_for_port(port)
            else:
                deadline = time.monotonic() + 15
                while "job worker started" not in log.read_text(errors="replace"):
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("the worker did not start")
                    time.sleep(0.05)
        yield log
    finally:
        stop(process, signal.SIGTERM)


def succeeded(admin: int) -> int:
    stats = json.loads(http_get(admin, "/admin/stats")[2])
    return int(stats["jobs"]["queues"]["bench"]["outcomes"]["succeeded"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fire(port: int, path: str, total: int, clients: int,
               expected: int) -> tuple[float, float, list[float]]:
    """`total` POSTs from `clients` keep-alive connections: (first send, last answer,
    latencies in ms)."""
    left = total
    latencies: list[float] = []
    url = f"http://127.0.0.1:{port}{path}"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                began = time.perf_counter()
                async with session.post(url, data=BODY) as response:
                    await response.read()
                    if response.status != expected:
                        raise HarnessError(f"POST {path} answered {response.status}, "
                                           f"expected {expected}")
                latencies.append((time.perf_counter() - began) * 1000)

        first = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        last = time.perf_counter()
    return first, last, latencies


def run_case(name: str, port: int, admin: int, args: argparse.Namespace) -> dict[str, Any]:
    before = succeeded(admin)
    first, enqueued, latencies = asyncio.run(fire(port, "/job", args.jobs, args.clients, 202))
    deadline = time.monotonic() + args.timeout
    done = before
    while done - before < args.jobs:
        if time.monotonic() > deadline:
            raise HarnessError(f"{name}: {done - before} of {args.jobs} jobs succeeded after "
                               f"{args.timeout:g}s")
        time.sleep(0.02)
        done = succeeded(admin)
    finished = time.perf_counter()
    return {
        "case": name, "jobs": args.jobs,
        "enqueued_per_s": round(args.jobs / (enqueued - first), 1),
        "enqueue_p50_ms": round(percentile(latencies, 0.50), 2),
        "enqueue_p99_ms": round(percentile(latencies, 0.99), 2),
        "enqueue_max_ms": round(max(latencies), 2),
        "completed_per_s": round(args.jobs / (finished - first), 1),
        "drained_after_s": round(finished - enqueued, 2),
    }


def run(args: argparse.Namespace, redis_bin: str) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis, origin = free_port(), free_port()
        stack.enter_context(log_on_failure("redis-server", workdir / "redis.log"))
        stack.enter_context(redis_server(redis_bin, workdir, redis))
        script = workdir / "origin.py"
        script.write_text(ORIGIN)
        stack.enter_context(child(["taskset", "-c", "1", sys.executable, str(script),
                                   str(origin)], workdir / "origin.log"))
        with log_on_failure("origin", workdir / "origin.log"):
            wait_for_port(origin)

        port, admin = free_port(), free_port()
        config = sidecar_config(workdir, port, admin, redis, origin, args.concurrency, True)
        with sidecar(workdir, "sidecar", "run", config, 0, port):
            first, last, latencies = asyncio.run(
                fire(port, "/direct", args.jobs, args.clients, 200))
            rows.append({"case": "direct", "jobs": args.jobs,
                         "requests_per_s": round(args.jobs / (last - first), 1),
                         "p50_ms": round(percentile(latencies, 0.5), 2),
                         "p99_ms": round(percentile(latencies, 0.99), 2),
                         "max_ms": round(max(latencies), 2)})
            asyncio.run(fire(port, "/job", min(300, args.jobs), args.clients, 202))  # warm-up
            time.sleep(1.0)
            rows.append(run_case("in-process", port, admin, args))

        port, admin = free_port(), free_port()
        config = sidecar_config(workdir, port, admin, redis, origin, args.concurrency, False)
        with sidecar(workdir, "enqueuer", "run", config, 0, port), \
                sidecar(workdir, "worker", "worker", config, 1, None):
            rows.append(run_case("separate worker", port, admin, args))
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load: tuple[str, str]) -> None:
    print(f"\njob throughput: {args.jobs} POSTs of {len(BODY)} bytes per case, "
          f"{args.clients} clients, queue concurrency {args.concurrency}; "
          f"load average {load[0]} -> {load[1]}")
    direct = rows[0]
    print(f"  {'direct (reference)':<20} {direct['requests_per_s']:>9.1f} req/s   "
          f"p50 {direct['p50_ms']:.2f} ms  p99 {direct['p99_ms']:.2f} ms  "
          f"max {direct['max_ms']:.2f} ms")
    for row in rows[1:]:
        print(f"  {row['case']:<20} {row['enqueued_per_s']:>9.1f} jobs/s enqueued "
              f"({row['enqueued_per_s'] / direct['requests_per_s']:.2f} x direct)   "
              f"enqueue p50 {row['enqueue_p50_ms']:.2f} ms  p99 {row['enqueue_p99_ms']:.2f} ms"
              f"  max {row['enqueue_max_ms']:.2f} ms")
        print(f"  {'':<20} {row['completed_per_s']:>9.1f} jobs/s completed "
              f"(all done {row['drained_after_s']:.2f} s after the last 202)")


def on_signal(signum: int, _frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="POSTs per case (3000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="queues.bench.concurrency (32)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds for a case's jobs to be done (120)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.jobs < args.clients or args.clients < 1 or args.concurrency < 1:
        parser.error("needs --jobs >= --clients >= 1 and --concurrency >= 1")
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: the sidecar on core 0, the clients on core 1", file=sys.stderr)
        return 2
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (apt-get install redis-server, or `make setup`)",
              file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {1})
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    try:
        rows = run(args, redis_bin)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, ValueError, KeyError,
            aiohttp.ClientError, subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    report(rows, args, (load_start, loadavg()))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
