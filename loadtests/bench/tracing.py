"""Tracing benchmark: what `tracing:` costs a cache hit, at `sample: 0`, `0.1` and `1`.

Four sidecars of one config but `tracing:` (absent, sample 0, 0.1, 1), each answering GET /item
from its L1 (`cache: {ttl: 60s, layers: [memory]}`, 1 KiB, access log off, metrics on), share a
redis-server and one PYTHONHASHSEED (common.shared_hash_seed). Their spans go to a small OTLP/HTTP
sink (an aiohttp app answering 200 to every export) on core 1 with wrk and the nginx origin; the
sidecars run on core 0, each idle while another is measured, in turns within each round (--rounds,
3 by default), medians. For each: req/s, p99 and the sidecar's CPU per request (/proc, measured
part only), and the CPU cost against tracing off.

    .venv/bin/python loadtests/bench/tracing.py [--duration 10] [--connections 64] [--rounds 3]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import (
    HarnessError,
    Result,
    child,
    free_port,
    loadavg,
    log_on_failure,
    nginx,
    on_signal,
    redis_server,
    shared_hash_seed,
    sidecar_cpu,
    sidecar_process,
    wait_for_port,
    which,
    wrk,
)
from edge import HIT_PATH, check, origin_block, sidecar_config, sidecar_hit

SINK = r"""
import sys
from aiohttp import web

count = 0

async def traces(request):
    global count
    await request.read()
    count += 1
    return web.Response(status=200, content_type="application/x-protobuf")

async def seen(request):
    return web.Response(text=str(count))

app = web.Application(client_max_size=64 * 1024**2)
app.router.add_post("/v1/traces", traces)
app.router.add_get("/count", seen)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

CASES = (("tracing off", None), ("tracing, sample 0", 0.0), ("tracing, sample 0.1", 0.1),
         ("tracing, sample 1", 1.0))


def run(args: argparse.Namespace, redis_bin: str) -> tuple[list[Result], dict[str, Any]]:
    extra: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-tracing-") as tmp, \
            ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        (workdir / "tmp").mkdir()
        origin, redis, sink = free_port(), free_port(), free_port()
        stack.enter_context(nginx(workdir, "origin", origin_block(origin), core=1))
        with log_on_failure("origin nginx", workdir / "origin.error.log"):
            wait_for_port(origin)
        stack.enter_context(redis_server(redis_bin, workdir, redis, core=1))
        stack.enter_context(child(["taskset", "-c", "1", sys.executable, "-c", SINK,
                                   str(sink)], workdir / "sink.log"))
        with log_on_failure("OTLP sink", workdir / "sink.log"):
            wait_for_port(sink)
        seed = shared_hash_seed()
        ports: dict[str, tuple[int, int]] = {}
        for number, (name, sample) in enumerate(CASES):
            port, admin = free_port(), free_port()
            config = sidecar_config(workdir, f"s{number}", port, admin, redis, origin, True)
            if sample is not None:
                config["tracing"] = {"endpoint": f"http://127.0.0.1:{sink}", "sample": sample}
            stack.enter_context(log_on_failure(name, workdir / f"s{number}.log"))
            stack.enter_context(sidecar_process(workdir, f"s{number}", config, port, env=seed))
            check(port, HIT_PATH, "Cache-Status", sidecar_hit)
            ports[name] = (port, admin)
            extra[name] = {}
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", file=sys.stderr, flush=True)
            for name, (port, admin) in ports.items():
                start: list[float] = []
                result = wrk(name, port, args.duration, args.connections, HIT_PATH,
                             after_warmup=lambda a=admin, s=start: s.append(sidecar_cpu(a)))
                used = sidecar_cpu(admin) - start[0]
                runs.setdefault(name, []).append(result)
                extra[name].setdefault("cpu_us", []).append(
                    round(used / (result.rps * args.duration) * 1e6, 2))
                print(f"  {name:<24}{result.rps:>9.0f} req/s", file=sys.stderr, flush=True)
    results = []
    for name, measured in runs.items():
        row = extra[name]
        row["rounds_rps"] = [round(r.rps) for r in measured]
        row["cpu_us_median"] = sorted(row["cpu_us"])[len(row["cpu_us"]) // 2]
        results.append(sorted(measured, key=lambda r: r.rps)[len(measured) // 2])
    return results, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for tool, fallback in (("wrk", "/usr/bin/wrk"), ("nginx", "/usr/sbin/nginx")):
        if which(tool, fallback) is None:
            print(f"SKIP: {tool} is not installed (apt-get install {tool}); nothing measured")
            return 0
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (`make setup`)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    try:
        results, extra = run(args, redis_bin)
    except KeyboardInterrupt:
        print("\ninterrupted; every process started was stopped", file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    load_end = loadavg()
    off = extra[CASES[0][0]]["cpu_us_median"]
    print(f"\ntracing on an L1 hit, 1 KiB, wrk -t1 -c{args.connections}, {args.rounds} round(s) "
          f"of {args.duration:g}s in turns (median); sidecars on core 0, wrk + origin + OTLP "
          "sink on core 1")
    print(f"load average: {load_start} at start, {load_end} at end")
    print(f"{'case':<24}{'req/s':>10}{'p99 ms':>9}{'CPU us/req':>12}{'vs off':>9}   rounds")
    for r in results:
        row = extra[r.name]
        cost = row["cpu_us_median"] / off - 1
        row["cpu_vs_off"] = round(cost, 4)
        print(f"{r.name:<24}{r.rps:>10.0f}{r.p99_ms:>9.2f}{row['cpu_us_median']:>12.1f}"
              f"{cost:>+9.1%}   {', '.join(str(x) for x in row['rounds_rps'])}")
    if args.json:
        args.json.write_text(json.dumps({
            "results": [asdict(r) | extra[r.name] for r in results],
            "loadavg_start": load_start, "loadavg_end": load_end}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
