"""Cache-hit benchmark: the sidecar's L1 (in-process) cache against nginx `proxy_cache`.

Measures requests/s and p50/p99 latency with wrk (64 connections by default) of GET /item, a
1 KiB body the origin serves with `Cache-Control: max-age=3600` and an ETag, answered from the
cache of:
  nginx proxy_cache   nginx (1 worker, upstream keepalive) with proxy_cache in a temp dir
  sidecar cache (L1)  the sidecar (1 worker, access log off), route with
                      cache: {ttl: 60s, layers: [memory, redis]}; Redis is a redis-server this
                      script starts on a free port
  sidecar, metrics off  the same with `metrics: {enabled: false, server_timing: false}`: the
                      difference is what metrics and Server-Timing cost a hit (goal < 10%)

Each cache is warmed until it answers a hit (`X-Cache-Status: HIT` for nginx, `Cache-Status:
sidecar; hit` for the sidecar), then both are measured in turns (--rounds, 3 by default) and
each reports its median round: a shared machine's slow spells then fall on both alike. The
origin (a tiny aiohttp app) counts what it serves, so the table shows that the measured runs
did not reach it.

The server under test runs on core 0 (`taskset -c 0`); wrk and the origin share core 1. Prints
a table and the ratio sidecar / nginx proxy_cache against the 0.5 goal (PASS or BELOW GOAL);
exits 0 either way unless --strict is given (then 1 when below the goal). Without wrk it prints
SKIP and exits 0; without nginx it measures only the sidecar (no ratio). Exits 2 when the
harness itself fails. Every process it starts is stopped on exit, on error and on Ctrl-C.

    .venv/bin/python loadtests/bench/cache_hit.py [--duration 10] [--connections 64]
        [--rounds 3] [--json out.json] [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
from common import http_get as get

GOAL_RATIO = 0.5
PATH = "/item"
BODY_SIZE = 1024
NGINX_CASE = "nginx proxy_cache"
SIDECAR_CASE = "sidecar cache (L1)"
BARE_CASE = "sidecar, metrics off"

# The origin: GET /item -> 1 KiB, cacheable for an hour, with a strong ETag. GET /_served says
# how many /item requests it has answered (to show the measured runs never reach it).
ORIGIN_APP = r"""
import sys
from aiohttp import web

BODY = b"x" * int(sys.argv[2])
served = 0

async def item(request):
    global served
    served += 1
    return web.Response(body=BODY, content_type="text/plain",
                        headers={"Cache-Control": "max-age=3600", "ETag": '"item-v1"'})

async def count(request):
    return web.json_response({"served": served})

app = web.Application()
app.router.add_get("/item", item)
app.router.add_get("/_served", count)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def warm(port: int, header: str, is_hit: Callable[[str], bool], tries: int = 20) -> str:
    """GET /item until `header` says hit; returns that header's value."""
    value = ""
    for _ in range(tries):
        status, headers, body = get(port, PATH)
        if status != 200 or len(body) != BODY_SIZE:
            raise HarnessError(f"GET {PATH} on :{port}: status {status}, {len(body)} bytes")
        value = headers.get(header.lower(), "")
        if is_hit(value):
            return value
        time.sleep(0.05)
    raise HarnessError(f"no cache hit on :{port} after {tries} requests; last {header}: {value!r}")


def origin_served(port: int) -> int:
    return int(json.loads(get(port, "/_served")[2])["served"])


def run(duration: float, connections: int, rounds: int, nginx_bin: str | None,
        redis_bin: str) -> tuple[list[Result], dict[str, dict[str, Any]]]:
    """Both caches up side by side, measured in turns (nginx, sidecar, nginx, ...): a slow
    spell of a shared machine then hits both, and each case reports its median round."""
    extra: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-cache-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as nobody
        (workdir / "tmp").mkdir()
        origin, proxy, side, admin, redis, bare, bare_admin = (free_port() for _ in range(7))

        stack.enter_context(child(["taskset", "-c", "1", sys.executable, "-c", ORIGIN_APP,
                                   str(origin), str(BODY_SIZE)], workdir / "origin.log"))
        with log_on_failure("origin", workdir / "origin.log"):
            wait_for_port(origin)

        cases: list[tuple[str, int]] = []
        if nginx_bin is not None:
            # nginx creates the cache directory itself, owned by its worker user.
            block = (
                f"  proxy_cache_path {workdir}/nginx-cache levels=1:2 keys_zone=bench:10m"
                " max_size=64m inactive=60m use_temp_path=off;\n"
                f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 128; }}\n"
                f"  server {{ listen 127.0.0.1:{proxy}; keepalive_requests 100000;\n"
                f"    location / {{ proxy_pass http://origin; proxy_http_version 1.1;\n"
                f"      proxy_set_header Connection \"\";\n"
                f"      proxy_cache bench; proxy_cache_valid 200 60s;\n"
                f"      add_header X-Cache-Status $upstream_cache_status always; }} }}")
            stack.enter_context(nginx(workdir, "proxy-cache", block, core=0))
            with log_on_failure("nginx", workdir / "proxy-cache.error.log"):
                wait_for_port(proxy)
            extra[NGINX_CASE] = {"warm": warm(proxy, "X-Cache-Status", lambda v: v == "HIT")}
            cases.append((NGINX_CASE, proxy))

        config = {
            "server": {"listen": f"127.0.0.1:{side}", "admin_listen": f"127.0.0.1:{admin}",
                       "workers": 1, "watch_config": False,
                       "state_dir": str(workdir / "sidecar-state")},
            "redis": {"url": f"redis://127.0.0.1:{redis}/0"},
            "upstreams": {"origin": {"url": f"http://127.0.0.1:{origin}"}},
            "log": {"access": False},
            "routes": [{"name": "item", "match": {"path": "/**"}, "upstream": "origin",
                        "cache": {"ttl": "60s", "layers": ["memory", "redis"]}}],
        }
        stack.enter_context(redis_server(redis_bin, workdir, redis))
        stack.enter_context(log_on_failure("sidecar", workdir / "sidecar.log"))
        seed = shared_hash_seed()  # the two sidecars compared share one
        stack.enter_context(sidecar_process(workdir, "sidecar", config, side, env=seed))
        extra[SIDECAR_CASE] = {"warm": warm(side, "Cache-Status",
                                            lambda v: v.startswith("sidecar; hit"))}
        cases.append((SIDECAR_CASE, side))
        # The same sidecar without metrics and Server-Timing: what they cost on a hit.
        bare_config = {**config, "metrics": {"enabled": False, "server_timing": False},
                       "server": {**config["server"], "listen": f"127.0.0.1:{bare}",
                                  "admin_listen": f"127.0.0.1:{bare_admin}",
                                  "state_dir": str(workdir / "sidecar-bare-state")}}
        stack.enter_context(log_on_failure("sidecar-bare", workdir / "sidecar-bare.log"))
        stack.enter_context(sidecar_process(workdir, "sidecar-bare", bare_config, bare,
                                            env=seed))
        extra[BARE_CASE] = {"warm": warm(bare, "Cache-Status",
                                         lambda v: v.startswith("sidecar; hit"))}
        cases.append((BARE_CASE, bare))

        admins = {SIDECAR_CASE: admin, BARE_CASE: bare_admin}
        for _ in range(rounds):
            for name, port in cases:
                row = extra[name]
                before = origin_served(origin)
                cpu = sidecar_cpu(admins[name]) if name in admins else 0.0
                result = wrk(name, port, duration, connections, PATH)
                runs.setdefault(name, []).append(result)
                if name in admins:
                    # CPU per request: far steadier than req/s on a machine with neighbours.
                    used = sidecar_cpu(admins[name]) - cpu
                    row.setdefault("cpu_us", []).append(
                        round(used / (result.rps * duration) * 1e6, 2))
                row["origin_requests"] = row.get("origin_requests", 0) + (
                    origin_served(origin) - before)

        stats = json.loads(get(admin, "/admin/stats")[2])["cache"]
        row = extra[SIDECAR_CASE]
        row["cache_counts"] = {f"{c['layer']}/{c['result']}": c["count"]
                               for c in stats["requests"] if c["route"] == "item"}
        row["redis"] = stats["redis"]
    results = []
    for name, measured in runs.items():
        extra[name]["rounds_rps"] = [round(r.rps) for r in measured]
        results.append(sorted(measured, key=lambda r: r.rps)[len(measured) // 2])
    return results, extra


def report(results: list[Result], extra: dict[str, dict[str, Any]], args: argparse.Namespace,
           load_start: str, load_end: str) -> tuple[float | None, str]:
    print(f"\ncache hit, 1 KiB body, {args.connections} connections, {args.rounds} alternating "
          f"rounds of {args.duration:g}s per case (median shown); "
          "server under test on core 0, wrk + origin on core 1")
    print(f"load average: {load_start} at start, {load_end} at end")
    print(f"{'case':<22}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
          f"{'origin reqs':>13}")
    for r in results:
        print(f"{r.name:<22}{r.rps:>10.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{r.errors:>8}"
              f"{extra[r.name].get('origin_requests', '?'):>13}"
              f"   rounds: {', '.join(str(x) for x in extra[r.name].get('rounds_rps', []))}")
    side = extra.get(SIDECAR_CASE, {})
    if side:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(side.get("cache_counts", {}).items()))
        print(f"sidecar cache counts (warm-up included): {counts}; redis {side.get('redis')}")
    by_name = {r.name: r for r in results}
    if BARE_CASE in by_name:
        cost = 1 - by_name[SIDECAR_CASE].rps / by_name[BARE_CASE].rps
        with_cpu, without_cpu = (sorted(extra[n]["cpu_us"])[len(extra[n]["cpu_us"]) // 2]
                                 for n in (SIDECAR_CASE, BARE_CASE))
        cpu_cost = 1 - without_cpu / with_cpu
        print(f"sidecar CPU per request (median round): {with_cpu} us with metrics, "
              f"{without_cpu} us without (rounds: {extra[SIDECAR_CASE]['cpu_us']} / "
              f"{extra[BARE_CASE]['cpu_us']})")
        print(f"metrics and Server-Timing cost {cpu_cost:.1%} of cache-hit throughput by CPU "
              f"per request, {cost:.1%} by median req/s (goal < 10%): "
              f"{'PASS' if cpu_cost < 0.10 else 'OVER'}")
    if NGINX_CASE not in by_name:
        print(f"\nratio sidecar / nginx proxy_cache: n/a (nginx not measured; goal >= "
              f"{GOAL_RATIO})")
        return None, "SKIPPED"
    ratio = by_name[SIDECAR_CASE].rps / by_name[NGINX_CASE].rps
    verdict = "PASS" if ratio >= GOAL_RATIO else "BELOW GOAL"
    print(f"\nratio sidecar / nginx proxy_cache: {ratio:.2f} (goal >= {GOAL_RATIO}) {verdict}")
    return ratio, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case (10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured turns per case, alternating; the median counts (3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when the ratio is below the goal")
    args = parser.parse_args()

    def write_json(data: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps(data, indent=2) + "\n")

    if which("wrk", "/usr/bin/wrk") is None:
        reason = "wrk is not installed (apt-get install wrk); nothing measured"
        print(f"SKIP: {reason}")
        write_json({"skipped": reason})
        return 0
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("needs 2 cores: the server under test on core 0, wrk on core 1", file=sys.stderr)
        return 2
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (apt-get install redis-server, or `make setup`); "
              "the sidecar's cache needs it", file=sys.stderr)
        return 2
    nginx_bin = which("nginx", "/usr/sbin/nginx")
    if nginx_bin is None:
        print("SKIP nginx proxy_cache: nginx is not installed (apt-get install nginx); "
              "measuring the sidecar alone, no ratio")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    try:
        results, extra = run(args.duration, args.connections, args.rounds, nginx_bin, redis_bin)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    load_end = loadavg()
    ratio, verdict = report(results, extra, args, load_start, load_end)
    write_json({"results": [asdict(r) | extra.get(r.name, {}) for r in results],
                "ratio": ratio, "goal": GOAL_RATIO, "verdict": verdict,
                "duration_s": args.duration, "connections": args.connections,
                "rounds": args.rounds,
                "loadavg_start": load_start, "loadavg_end": load_end,
                "nginx": "measured" if nginx_bin else "not installed"})
    return 1 if args.strict and verdict == "BELOW GOAL" else 0


if __name__ == "__main__":
    sys.exit(main())
