"""Edge benchmark: the sidecar's HTTP/1.1 front end against nginx and a bare-protocol ceiling.

Measures requests/s and p50/p99 latency with wrk (1 thread, 64 connections by default) of a
1 KiB body, every case in the same run:
  nginx proxy_cache     nginx (1 worker) answering GET /item from proxy_cache (a hit)
  nginx proxy_pass      the same nginx, GET /pass proxied to the origin (upstream keepalive 64,
                        proxy_http_version 1.1, `Connection ""`)
  sidecar L1 hit        `python -m sidecar run` (1 worker, access log off, metrics on: the
                        default), GET /item from a route with cache: {ttl: 60s, layers: [memory]};
                        its Redis is a redis-server this script starts
  sidecar pass-through  the same process, GET /pass: a route with no policies
  sidecar L1 hit, metrics off / sidecar pass-through, metrics off
                        a second sidecar, the same config with
                        `metrics: {enabled: false, server_timing: false}`
  bare protocol         the ceiling for Python here: an asyncio.Protocol on uvloop parsing with
                        httptools.HttpRequestParser that answers every request with one
                        transport.write of a constant 1 KiB HTTP/1.1 response (keep-alive)

The origin is nginx too (`return 200` of the 1 KiB body: /item with `Cache-Control:
max-age=3600` and an ETag, /pass with `Cache-Control: no-store`), so it is never the bottleneck.

Before measuring, every case must answer 200 with a 1024-byte body; the nginx cache must say
`X-Cache-Status: HIT` and the sidecar hit cases a `Cache-Status` with `hit`. Then all cases are
measured in turns within each round (--rounds, 3 by default) and each reports its median round:
a shared machine's slow spells then fall on all alike. For the sidecar cases the CPU time the
process used during the measured run (after wrk's 2 s warm-up; `/proc/<pid>/stat`, the pid from
/admin/stats) is divided by its requests (req/s x duration): metrics on against off is compared
by CPU per request, far steadier than req/s on a machine with neighbours. Both sidecars get the
same PYTHONHASHSEED, drawn per run (common.shared_hash_seed).

The servers under test (nginx proxy, both sidecars, the bare server) run on core 0 (`taskset -c
0`), each idle while another is measured; wrk and the origin share core 1. Prints a table and
the ratios against their goals, each PASS or BELOW GOAL:
  sidecar L1 hit / nginx proxy_cache, req/s           goal >= 0.8
  sidecar pass-through / nginx proxy_pass, req/s      goal >= 0.5
  sidecar p99 / nginx p99, hit and pass-through       goal <= 2
  CPU per request, metrics on over off, hit and pass  goal <= +5%
  bare protocol / nginx proxy_cache, req/s            no goal: the ceiling
Exits 0 either way unless --strict is given (then 1 when any is below its goal). Without wrk or
nginx it prints SKIP and exits 0. Exits 2 when the harness itself fails (a server that does not
start or answers wrongly). Every process it starts is stopped on exit, on error and on Ctrl-C.

    .venv/bin/python loadtests/bench/edge.py [--duration 10] [--connections 64] [--rounds 3]
        [--json out.json] [--strict]
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
from dataclasses import asdict, dataclass
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

BODY_SIZE = 1024
HIT_PATH = "/item"
PASS_PATH = "/pass"

NGINX_CACHE = "nginx proxy_cache"
NGINX_PASS = "nginx proxy_pass"
SIDE_HIT = "sidecar L1 hit"
SIDE_PASS = "sidecar pass-through"
BARE_HIT = "sidecar L1 hit, metrics off"
BARE_PASS = "sidecar pass-through, metrics off"
BARE = "bare protocol"

# The ceiling: no routing, no policies, no response building; one write of a constant per
# request. Pipelined requests are answered in order (the parser calls back once per request).
BARE_APP = r"""
import asyncio
import sys

import httptools
import uvloop

BODY = b"x" * int(sys.argv[2])
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
            % len(BODY)) + BODY


class Bare(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self):
        if self.closing:
            return
        self.transport.write(RESPONSE)
        if not self.parser.should_keep_alive():
            self.closing = True
            self.transport.close()


async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Bare, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()


uvloop.run(main())
"""


@dataclass
class Goal:
    name: str
    value: float
    goal: float | None  # None: shown, no verdict
    higher_is_better: bool
    percent: bool = False

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return "(no goal)"
        ok = self.value >= self.goal if self.higher_is_better else self.value <= self.goal
        return "PASS" if ok else "BELOW GOAL"


def origin_block(port: int) -> str:
    body = "x" * BODY_SIZE
    return (f"  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n"
            f"    default_type text/plain;\n"
            f"    location = {HIT_PATH} {{ add_header Cache-Control \"max-age=3600\";\n"
            f"      add_header ETag '\"item-v1\"'; return 200 \"{body}\"; }}\n"
            f"    location = {PASS_PATH} {{ add_header Cache-Control \"no-store\";\n"
            f"      return 200 \"{body}\"; }} }}")


def proxy_block(workdir: Path, port: int, origin: int) -> str:
    # nginx creates the cache directory itself, owned by its worker user.
    return (f"  proxy_cache_path {workdir}/nginx-cache levels=1:2 keys_zone=bench:10m"
            " max_size=64m inactive=60m use_temp_path=off;\n"
            f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64;"
            " keepalive_requests 1000000; }\n"
            f"  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n"
            "    proxy_http_version 1.1; proxy_set_header Connection \"\";\n"
            f"    location = {HIT_PATH} {{ proxy_pass http://origin;\n"
            "      proxy_cache bench; proxy_cache_valid 200 60s;\n"
            "      add_header X-Cache-Status $upstream_cache_status always; }\n"
            f"    location = {PASS_PATH} {{ proxy_pass http://origin; }} }}")


def sidecar_config(workdir: Path, name: str, port: int, admin: int, redis: int, origin: int,
                   metrics: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
                   "workers": 1, "watch_config": False,
                   "state_dir": str(workdir / f"{name}-state")},
        "redis": {"url": f"redis://127.0.0.1:{redis}/0"},
        "upstreams": {"origin": {"url": f"http://127.0.0.1:{origin}"}},
        "log": {"access": False},
        "routes": [
            {"name": "item", "match": {"path": HIT_PATH}, "upstream": "origin",
             "cache": {"ttl": "60s", "layers": ["memory"]}},
            {"name": "pass", "match": {"path": PASS_PATH}, "upstream": "origin"},
        ],
    }
    if not metrics:
        config["metrics"] = {"enabled": False, "server_timing": False}
    return config


def check(port: int, path: str, header: str | None = None,
          is_hit: Callable[[str], bool] | None = None, tries: int = 20) -> str:
    """GET `path` until it answers 200 with a 1 KiB body (and, given `header`, until that
    header says hit); returns that header's value."""
    value = ""
    for _ in range(tries):
        status, headers, body = get(port, path)
        if status != 200 or len(body) != BODY_SIZE:
            raise HarnessError(f"GET {path} on :{port}: status {status}, {len(body)} bytes "
                               f"(expected 200, {BODY_SIZE}): {body[:200]!r}")
        if header is None or is_hit is None:
            return ""
        value = headers.get(header.lower(), "")
        if is_hit(value):
            return value
        time.sleep(0.05)
    raise HarnessError(f"no cache hit for {path} on :{port} after {tries} requests; "
                       f"last {header}: {value!r}")


def sidecar_hit(value: str) -> bool:
    return "hit" in (part.strip() for part in value.lower().split(";"))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(name: str, port: int, path: str, duration: float, connections: int,
            admin: int | None) -> tuple[Result, float | None]:
    """One wrk run; with the sidecar's `admin` port also the CPU microseconds it used per
    request during the measured part (wrk's warm-up left out)."""
    if admin is None:
        return wrk(name, port, duration, connections, path), None
    start: list[float] = []
    result = wrk(name, port, duration, connections, path,
                 after_warmup=lambda: start.append(sidecar_cpu(admin)))
    used = sidecar_cpu(admin) - start[0]
    return result, round(used / (result.rps * duration) * 1e6, 2)


def run(duration: float, connections: int, rounds: int, redis_bin: str
        ) -> tuple[list[Result], dict[str, dict[str, Any]]]:
    """Every server up side by side, measured in turns within each round; each case reports
    its median round (by req/s), the sidecar cases also their median CPU per request."""
    extra: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-edge-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as nobody
        (workdir / "tmp").mkdir()
        (origin, proxy, redis, side, side_admin, bare_side, bare_admin,
         bare) = (free_port() for _ in range(8))

        # The origin, on core 1 with wrk.
        stack.enter_context(nginx(workdir, "origin", origin_block(origin), core=1))
        with log_on_failure("origin nginx", workdir / "origin.error.log"):
            wait_for_port(origin)
        check(origin, HIT_PATH)
        check(origin, PASS_PATH)

        # nginx: proxy_cache and proxy_pass in one process on core 0.
        stack.enter_context(nginx(workdir, "proxy", proxy_block(workdir, proxy, origin),
                                  core=0))
        with log_on_failure("proxy nginx", workdir / "proxy.error.log"):
            wait_for_port(proxy)
        extra[NGINX_CACHE] = {"warm": check(proxy, HIT_PATH, "X-Cache-Status",
                                            lambda v: v == "HIT")}
        check(proxy, PASS_PATH)
        extra[NGINX_PASS] = {}

        # The two sidecars, metrics on (the default) and off, sharing one redis-server and one
        # hash seed (common.shared_hash_seed says why).
        stack.enter_context(redis_server(redis_bin, workdir, redis, core=1))
        seed = shared_hash_seed()
        admins: dict[str, int] = {}
        for name, port, admin, metrics, hit_case, pass_case in (
                ("sidecar", side, side_admin, True, SIDE_HIT, SIDE_PASS),
                ("sidecar-nometrics", bare_side, bare_admin, False, BARE_HIT, BARE_PASS)):
            config = sidecar_config(workdir, name, port, admin, redis, origin, metrics)
            stack.enter_context(log_on_failure(name, workdir / f"{name}.log"))
            stack.enter_context(sidecar_process(workdir, name, config, port, env=seed))
            extra[hit_case] = {"warm": check(port, HIT_PATH, "Cache-Status", sidecar_hit)}
            check(port, PASS_PATH)
            extra[pass_case] = {}
            admins[hit_case] = admins[pass_case] = admin

        # The bare protocol server, on core 0.
        stack.enter_context(child(["taskset", "-c", "0", sys.executable, "-c", BARE_APP,
                                   str(bare), str(BODY_SIZE)], workdir / "bare.log"))
        with log_on_failure("bare protocol server", workdir / "bare.log"):
            wait_for_port(bare)
        check(bare, "/")
        extra[BARE] = {}

        cases = [(NGINX_CACHE, proxy, HIT_PATH), (NGINX_PASS, proxy, PASS_PATH),
                 (SIDE_HIT, side, HIT_PATH), (SIDE_PASS, side, PASS_PATH),
                 (BARE_HIT, bare_side, HIT_PATH), (BARE_PASS, bare_side, PASS_PATH),
                 (BARE, bare, "/")]
        for number in range(1, rounds + 1):
            print(f"round {number}/{rounds}", file=sys.stderr, flush=True)
            for name, port, path in cases:
                result, cpu_us = measure(name, port, path, duration, connections,
                                         admins.get(name))
                runs.setdefault(name, []).append(result)
                if cpu_us is not None:
                    extra[name].setdefault("cpu_us", []).append(cpu_us)
                print(f"  {name:<34}{result.rps:>9.0f} req/s", file=sys.stderr, flush=True)

        all_stats = json.loads(get(side_admin, "/admin/stats")[2])
        extra[SIDE_HIT]["compiled"] = len(all_stats.get("compiled", []))
        stats = all_stats.get("cache", {})
        extra[SIDE_HIT]["cache_counts"] = {
            f"{c['layer']}/{c['result']}": c["count"]
            for c in stats.get("requests", []) if c.get("route") == "item"}
    results = []
    for name, measured in runs.items():
        row = extra[name]
        row["rounds_rps"] = [round(r.rps) for r in measured]
        if "cpu_us" in row:
            row["cpu_us_median"] = median(row["cpu_us"])
        results.append(sorted(measured, key=lambda r: r.rps)[len(measured) // 2])
    return results, extra


def goals(results: list[Result], extra: dict[str, dict[str, Any]]) -> list[Goal]:
    by = {r.name: r for r in results}

    def cpu_cost(on: str, off: str) -> float:
        return float(extra[on]["cpu_us_median"]) / float(extra[off]["cpu_us_median"]) - 1

    return [
        Goal("sidecar L1 hit / nginx proxy_cache, req/s",
             by[SIDE_HIT].rps / by[NGINX_CACHE].rps, 0.8, True),
        Goal("sidecar pass-through / nginx proxy_pass, req/s",
             by[SIDE_PASS].rps / by[NGINX_PASS].rps, 0.5, True),
        Goal("sidecar L1 hit p99 / nginx proxy_cache p99",
             by[SIDE_HIT].p99_ms / by[NGINX_CACHE].p99_ms, 2.0, False),
        Goal("sidecar pass-through p99 / nginx proxy_pass p99",
             by[SIDE_PASS].p99_ms / by[NGINX_PASS].p99_ms, 2.0, False),
        Goal("CPU/request, metrics on vs off, L1 hit", cpu_cost(SIDE_HIT, BARE_HIT), 0.05,
             False, percent=True),
        Goal("CPU/request, metrics on vs off, pass-through", cpu_cost(SIDE_PASS, BARE_PASS),
             0.05, False, percent=True),
        Goal("bare protocol / nginx proxy_cache, req/s",
             by[BARE].rps / by[NGINX_CACHE].rps, None, True),
    ]


def report(results: list[Result], extra: dict[str, dict[str, Any]], checks: list[Goal],
           args: argparse.Namespace, load_start: str, load_end: str) -> None:
    print(f"\nedge, 1 KiB body, wrk -t1 -c{args.connections}, {args.rounds} round(s) of "
          f"{args.duration:g}s per case, cases in turns (median round shown); "
          "server under test on core 0, wrk + origin (nginx) on core 1")
    print(f"load average: {load_start} at start, {load_end} at end")
    print(f"{'case':<34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'CPU us/req':>12}   rounds req/s")
    for r in results:
        row = extra[r.name]
        cpu = f"{row['cpu_us_median']:.1f}" if "cpu_us_median" in row else "-"
        print(f"{r.name:<34}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>8}"
              f"{cpu:>12}   {', '.join(str(x) for x in row['rounds_rps'])}")
    print(f"sidecar modules compiled (sidecar/native.py): {extra[SIDE_HIT].get('compiled', 0)}"
          + ("" if extra[SIDE_HIT].get("compiled") else " (pure Python)"))
    counts = extra[SIDE_HIT].get("cache_counts", {})
    if counts:
        print("sidecar cache counts, route item (warm-up included): "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print()
    for g in checks:
        if g.percent:
            value, goal = f"{g.value:+.1%}", "" if g.goal is None else f"<= +{g.goal:.0%}"
        else:
            op = ">=" if g.higher_is_better else "<="
            value, goal = f"{g.value:.2f}", "" if g.goal is None else f"{op} {g.goal:g}"
        print(f"{g.name:<50}{value:>8}   goal {goal or '-':<8} {g.verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case (10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured turns per case, all cases in turn; the median counts (3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any ratio is below its goal")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--rounds, --duration and --connections must be positive")

    def write_json(data: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps(data, indent=2) + "\n")

    for tool, fallback in (("wrk", "/usr/bin/wrk"), ("nginx", "/usr/sbin/nginx")):
        if which(tool, fallback) is None:
            reason = f"{tool} is not installed (apt-get install {tool}); nothing measured"
            print(f"SKIP: {reason}")
            write_json({"skipped": reason})
            return 0
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("needs 2 cores: the server under test on core 0, wrk on core 1", file=sys.stderr)
        return 2
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (apt-get install redis-server, or `make setup`); "
              "the sidecar needs it", file=sys.stderr)
        return 2

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    try:
        results, extra = run(args.duration, args.connections, args.rounds, redis_bin)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    load_end = loadavg()
    checks = goals(results, extra)
    report(results, extra, checks, args, load_start, load_end)
    below = [g.name for g in checks if g.verdict == "BELOW GOAL"]
    write_json({"results": [asdict(r) | extra.get(r.name, {}) for r in results],
                "ratios": [{"name": g.name, "value": round(g.value, 4), "goal": g.goal,
                            "higher_is_better": g.higher_is_better, "verdict": g.verdict}
                           for g in checks],
                "verdict": "BELOW GOAL" if below else "PASS", "below_goal": below,
                "duration_s": args.duration, "connections": args.connections,
                "rounds": args.rounds, "body_bytes": BODY_SIZE,
                "loadavg_start": load_start, "loadavg_end": load_end})
    return 1 if args.strict and below else 0


if __name__ == "__main__":
    sys.exit(main())
