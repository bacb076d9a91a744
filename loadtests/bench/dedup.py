"""Dedup benchmark: N concurrent identical GETs of a slow URL, coalesced into one upstream call.

Fires --clients (100) identical GETs of /slow?r=<case>-<round> at the same moment (all N
connections are opened first, then every request is written in one go) at:
  sidecar local      one sidecar (1 worker), route with dedup: {scope: local, wait: 30s}
  sidecar cluster    two sidecar instances (two `python -m sidecar run`, 1 worker each) sharing
                     one redis-server, dedup: {scope: cluster, wait: 30s}; the clients are split
                     half and half between them
  nginx cache_lock   nginx (1 worker) with proxy_cache, proxy_cache_lock on,
                     proxy_cache_lock_timeout 30s (only when nginx is installed)
The origin (a tiny aiohttp app) answers /slow after --delay seconds (1.0) and counts its calls
per URL; every round of every case uses a URL of its own, so nothing comes from an earlier one.

For each response the client records when its last byte arrived. The first response to
complete is the leader's; a follower's extra wait is its completion time minus the leader's,
i.e. how long it waited beyond the upstream's own latency. Per case it prints the upstream
calls per N requests in each round, the leader's latency, the slowest client's total time, and
the followers' extra wait p50 / p99 / max over all rounds (--rounds, 3; the cases take turns).
Goal: every follower answered within 10 ms of the leader (max extra wait <= 10 ms), checked
for the sidecar cases; nginx is reported for reference (its lock waiters poll every 500 ms).

The servers under test and redis-server run on core 0 (`taskset -c 0`); this script (the
client) and the origin on core 1. Exits 0 whatever the figures unless --strict is given (then
1 when a sidecar case misses the goal or makes more than one upstream call per round); 2 when
the harness itself fails. Without nginx it measures the sidecar alone (SKIP nginx). It needs
redis-server (`make setup` installs it). Every process it starts is stopped on exit, on error
and on Ctrl-C.

    .venv/bin/python loadtests/bench/dedup.py [--clients 100] [--delay 1.0] [--rounds 3]
        [--json out.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    HarnessError,
    child,
    free_port,
    http_get,
    loadavg,
    log_on_failure,
    nginx,
    on_signal,
    redis_server,
    sidecar_process,
    tail,
    wait_for_port,
    which,
)

GOAL_MS = 10.0
HOST = "dedup.bench"  # the same Host everywhere: the dedup key includes it
FOLLOWER_HEADER = "x-sidecar-dedup"
LOCAL_CASE = "sidecar local"
CLUSTER_CASE = "sidecar cluster (2)"
NGINX_CASE = "nginx cache_lock"
SETTLE_S = 0.3  # pause between cases: lets leases, publications and closes finish

# The origin: GET /slow?... -> a small body naming the URL, after `delay` seconds. GET /_calls
# -> {"<path?query>": calls} for every URL it was asked for.
ORIGIN_APP = r"""
import asyncio
import sys
from collections import Counter
from aiohttp import web

DELAY = float(sys.argv[2])
calls = Counter()

async def slow(request):
    calls[request.path_qs] += 1
    await asyncio.sleep(DELAY)
    return web.Response(body=f"dedup bench {request.path_qs}\n".encode(),
                        content_type="text/plain")

async def count(request):
    return web.json_response(calls)

app = web.Application()
app.router.add_get("/slow", slow)
app.router.add_get("/_calls", count)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
            backlog=1024)
"""


@contextmanager
def logs_on_failure(case: Case, *more: Path) -> Iterator[None]:
    """Adds the tails of the case's server logs (and `more`) to a failed round's error."""
    try:
        yield
    except HarnessError as exc:
        logs = "".join(f"\n--- {log.name}:\n{tail(log)}" for log in (*case.logs, *more))
        raise HarnessError(f"{case.name}: {exc}{logs}") from exc


# --- the client --------------------------------------------------------------------------------


class Exchange(asyncio.Protocol):
    """One client connection: writes its request when told, records when the response (with a
    Content-Length; the origin always sends one) has fully arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head_end = -1
        self.length = -1
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done: asyncio.Future[float] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.done.done():
            return
        self.buffer += data
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if "content-length" not in self.headers:
                self.done.set_exception(HarnessError(
                    f"response without Content-Length: {lines[0]!r} {self.headers}"))
                return
            self.length = int(self.headers["content-length"])
        if len(self.buffer) >= self.head_end + self.length:
            self.done.set_result(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(HarnessError(
                f"connection closed before the whole response ({exc or 'EOF'}; "
                f"{len(self.buffer)} bytes read)"))

    @property
    def body(self) -> bytes:
        return bytes(self.buffer[self.head_end:self.head_end + self.length])


@dataclass
class Round:
    target: str
    clients: int
    upstream_calls: int
    leader_ms: float  # first complete response, from the moment the requests went out
    slowest_ms: float  # last complete response, same origin
    send_ms: float  # how long writing the N requests took (the client's own skew)
    extra_ms: list[float]  # every follower's completion minus the leader's, sorted
    remote_extra_ms: list[float]  # those of followers on another instance than the leader's
    leaders: int  # responses not marked as a follower (sidecar) / MISS (nginx)
    first_is_leader: bool
    statuses: dict[str, int] = field(default_factory=dict)  # X-Cache-Status counts (nginx)


async def fire(ports: list[int], target: str, clients: int,
               timeout: float) -> tuple[list[float], list[Exchange], float, float]:
    """N connections spread over `ports`, opened first; then every request written at once.
    Returns the completion times, the exchanges, the send start and the send duration."""
    loop = asyncio.get_running_loop()
    request = (f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: sidecar-dedup-bench\r\n"
               "Accept: */*\r\n\r\n").encode()
    exchanges: list[Exchange] = []
    try:
        async with asyncio.timeout(15):
            connected = await asyncio.gather(*(
                loop.create_connection(lambda: Exchange(loop), "127.0.0.1",
                                       ports[i % len(ports)]) for i in range(clients)))
        exchanges = [protocol for _, protocol in connected]
        await asyncio.sleep(0.2)  # let the servers accept every connection first
        gc.collect()
        gc.disable()  # no collection pause of the client's own while responses arrive
        start = time.perf_counter()
        for exchange in exchanges:
            assert exchange.transport is not None
            exchange.transport.write(request)
        send = time.perf_counter() - start
        try:
            async with asyncio.timeout(timeout):
                done = await asyncio.gather(*(e.done for e in exchanges))
        except TimeoutError:
            missing = sum(not e.done.done() for e in exchanges)
            raise HarnessError(f"{missing} of {clients} responses to {target} not complete "
                               f"after {timeout:g}s") from None
    finally:
        gc.enable()
        for exchange in exchanges:
            if exchange.transport is not None:
                exchange.transport.close()
        for exchange in exchanges:  # a failed round must not leave "never retrieved" noise
            if exchange.done.done() and not exchange.done.cancelled():
                exchange.done.exception()
    expected = f"dedup bench {target}\n".encode()
    for exchange in exchanges:
        if exchange.status != 200 or exchange.body != expected:
            raise HarnessError(f"GET {target}: status {exchange.status}, body "
                               f"{exchange.body[:200]!r}, headers {exchange.headers}")
    return list(done), exchanges, start, send


def origin_calls(port: int) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads(http_get(port, "/_calls")[2]).items()}


def measure(case: str, ports: list[int], origin: int, target: str, clients: int,
            timeout: float) -> Round:
    done, exchanges, start, send = asyncio.run(fire(ports, target, clients, timeout))
    first = min(done)
    order = sorted(range(len(done)), key=done.__getitem__)
    if case == NGINX_CASE:
        statuses = Counter(e.headers.get("x-cache-status", "?") for e in exchanges)
        is_leader = [e.headers.get("x-cache-status") != "HIT" for e in exchanges]
    else:
        statuses = Counter()
        is_leader = [e.headers.get(FOLLOWER_HEADER) != "follower" for e in exchanges]
    return Round(
        target=target, clients=clients,
        upstream_calls=origin_calls(origin).get(target, 0),
        leader_ms=(first - start) * 1000, slowest_ms=(max(done) - start) * 1000,
        send_ms=send * 1000,
        extra_ms=[(done[i] - first) * 1000 for i in order[1:]],
        remote_extra_ms=[(done[i] - first) * 1000 for i in order[1:]
                         if i % len(ports) != order[0] % len(ports)],
        leaders=sum(is_leader), first_is_leader=is_leader[order[0]],
        statuses=dict(statuses))


# --- the servers -------------------------------------------------------------------------------


def sidecar_config(workdir: Path, name: str, port: int, admin: int, redis: int, origin: int,
                   scope: str) -> dict[str, Any]:
    return {
        "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
                   "workers": 1, "watch_config": False,
                   "state_dir": str(workdir / f"{name}-state")},
        "redis": {"url": f"redis://127.0.0.1:{redis}/0"},
        "upstreams": {"origin": {"url": f"http://127.0.0.1:{origin}"}},
        "log": {"access": False},
        "routes": [{"name": "slow", "match": {"path": "/**"}, "upstream": "origin",
                    "dedup": {"scope": scope, "wait": "30s"}}],
    }


def admin_stats(admin: int) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(http_get(admin, "/admin/stats")[2])
    return stats


def wait_cluster_ready(admin: int, timeout: float = 15.0) -> None:
    """Until the instance's dedup is coordinated through Redis (connected and subscribed):
    before that a cluster-scope flight falls back to this instance only."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        state = admin_stats(admin)["dedup"]["redis"]
        if state == "up":
            return
        time.sleep(0.1)
    raise HarnessError(f"sidecar admin :{admin}: dedup redis still {state!r} after {timeout:g}s")


def dedup_events(admins: list[int]) -> dict[str, int]:
    events: Counter[str] = Counter()
    for admin in admins:
        for row in admin_stats(admin)["dedup"]["events"]:
            if row["route"] == "slow":
                events[row["event"]] += int(row["count"])
    return dict(events)


@dataclass
class Case:
    name: str
    ports: list[int]
    admins: list[int]  # sidecar admin listeners (none for nginx)
    logs: list[Path]  # the servers' logs, shown when a round fails
    rounds: list[Round] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)


def run(clients: int, delay: float, rounds: int, nginx_bin: str | None,
        redis_bin: str) -> list[Case]:
    """Every server up side by side; the cases take turns, round by round."""
    timeout = delay + 30 + 15  # the dedup wait, nginx's lock timeout, and some slack
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-dedup-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as nobody
        (workdir / "tmp").mkdir()
        origin, redis, proxy = free_port(), free_port(), free_port()

        stack.enter_context(child(["taskset", "-c", "1", sys.executable, "-c", ORIGIN_APP,
                                   str(origin), str(delay)], workdir / "origin.log"))
        with log_on_failure("origin", workdir / "origin.log"):
            wait_for_port(origin)
        with log_on_failure("redis-server", workdir / "redis.log"):
            stack.enter_context(redis_server(redis_bin, workdir, redis, core=0))

        cases: list[Case] = []
        for name, scope, count in ((LOCAL_CASE, "local", 1), (CLUSTER_CASE, "cluster", 2)):
            case = Case(name, [], [], [])
            for i in range(count):
                instance = f"sidecar-{scope}-{i}"
                port, admin = free_port(), free_port()
                config = sidecar_config(workdir, instance, port, admin, redis, origin, scope)
                log = workdir / f"{instance}.log"
                stack.enter_context(log_on_failure(instance, log))
                stack.enter_context(sidecar_process(workdir, instance, config, port))
                wait_for_port(admin)
                case.ports.append(port)
                case.admins.append(admin)
                case.logs.append(log)
            if scope == "cluster":
                for admin in case.admins:
                    wait_cluster_ready(admin)
            cases.append(case)

        if nginx_bin is not None:
            block = (
                f"  proxy_cache_path {workdir}/nginx-cache levels=1:2 keys_zone=dedup:10m"
                " max_size=64m inactive=60m use_temp_path=off;\n"
                f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 32; }}\n"
                f"  server {{ listen 127.0.0.1:{proxy} backlog=1024;\n"
                f"    location / {{ proxy_pass http://origin; proxy_http_version 1.1;\n"
                f"      proxy_set_header Connection \"\";\n"
                f"      proxy_cache dedup; proxy_cache_valid 200 60s;\n"
                f"      proxy_cache_key $scheme$proxy_host$request_uri;\n"
                f"      proxy_cache_lock on; proxy_cache_lock_timeout 30s;\n"
                f"      add_header X-Cache-Status $upstream_cache_status always; }} }}")
            stack.enter_context(nginx(workdir, "cache-lock", block, core=0))
            with log_on_failure("nginx", workdir / "cache-lock.error.log"):
                wait_for_port(proxy)
            cases.append(Case(NGINX_CASE, [proxy], [], [workdir / "cache-lock.error.log"]))

        # Warm-up: one request per instance on a URL of its own (upstream connections, code
        # paths); it also checks that every server answers the origin's body.
        for case in cases:
            slug = case.name.split()[-1].strip("()")
            with logs_on_failure(case, workdir / "origin.log"):
                measure(case.name, case.ports, origin, f"/slow?r={slug}-warm",
                        len(case.ports), timeout)
            time.sleep(SETTLE_S)
        before = {case.name: dedup_events(case.admins) for case in cases if case.admins}

        for number in range(1, rounds + 1):
            for index, case in enumerate(cases):
                target = f"/slow?r=c{index}-{number}-{os.getpid()}"
                with logs_on_failure(case, workdir / "origin.log"):
                    case.rounds.append(measure(case.name, case.ports, origin, target,
                                               clients, timeout))
                time.sleep(SETTLE_S)

        for case in cases:
            if case.admins:
                after = dedup_events(case.admins)
                case.events = {k: v - before[case.name].get(k, 0) for k, v in after.items()
                               if v - before[case.name].get(k, 0)}
        return cases


# --- the report --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (0 when empty)."""
    if not values:
        return 0.0
    rank = max(1, min(len(values), int(-(-q * len(values) // 100))))
    return values[rank - 1]


def summary(case: Case) -> dict[str, Any]:
    extra = sorted(x for r in case.rounds for x in r.extra_ms)
    sidecar = case.name != NGINX_CASE
    max_extra = extra[-1] if extra else 0.0
    calls = [r.upstream_calls for r in case.rounds]
    verdict = "n/a (reference)"
    if sidecar:
        verdict = "PASS" if max_extra <= GOAL_MS and all(c == 1 for c in calls) else "MISSED"
    return {
        "case": case.name, "instances": len(case.ports),
        "upstream_calls": calls, "clients": case.rounds[0].clients if case.rounds else 0,
        "leader_ms": [round(r.leader_ms, 1) for r in case.rounds],
        "slowest_ms": [round(r.slowest_ms, 1) for r in case.rounds],
        "send_ms": [round(r.send_ms, 2) for r in case.rounds],
        "extra_p50_ms": round(percentile(extra, 50), 2),
        "extra_p99_ms": round(percentile(extra, 99), 2),
        "extra_max_ms": round(max_extra, 2),
        "extra_max_per_round_ms": [round(r.extra_ms[-1], 2) if r.extra_ms else 0.0
                                   for r in case.rounds],
        "remote_extra_max_ms": ([round(max(r.remote_extra_ms), 2) for r in case.rounds]
                                if len(case.ports) > 1 else None),
        "leaders": [r.leaders for r in case.rounds],
        "first_is_leader": [r.first_is_leader for r in case.rounds],
        "cache_status": [r.statuses for r in case.rounds] if not sidecar else None,
        "dedup_events": case.events if sidecar else None,
        "verdict": verdict,
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load_start: str,
           load_end: str) -> None:
    print(f"\ndedup: {args.clients} concurrent identical GETs per round, origin delay "
          f"{args.delay:g}s, {args.rounds} rounds per case (cases in turns); servers + redis "
          "on core 0, client + origin on core 1")
    print(f"load average: {load_start} at start, {load_end} at end")
    print(f"{'case':<20}{'upstream calls':>16}{'leader ms':>11}{'slowest ms':>12}"
          f"{'follower extra wait ms':>26}   goal <= {GOAL_MS:g} ms")
    print(f"{'':<20}{'per round / N':>16}{'median':>11}{'max':>12}{'p50 / p99 / max':>26}")
    for row in rows:
        counts = row["upstream_calls"]
        calls = (f"{counts[0]} (x{len(counts)})" if len(set(counts)) == 1
                 else ",".join(str(c) for c in counts)) + f" / {row['clients']}"
        leader = sorted(row["leader_ms"])[len(row["leader_ms"]) // 2]
        extra = f"{row['extra_p50_ms']:.2f} / {row['extra_p99_ms']:.2f} / {row['extra_max_ms']:.2f}"
        print(f"{row['case']:<20}{calls:>16}{leader:>11.1f}{max(row['slowest_ms']):>12.1f}"
              f"{extra:>26}   {row['verdict']}")
    print()
    for row in rows:
        per_round = ", ".join(f"{x:.2f}" for x in row["extra_max_per_round_ms"])
        send = max(row["send_ms"])
        print(f"{row['case']}: max extra wait per round {per_round} ms; requests written in "
              f"<= {send:.2f} ms; leaders per round {row['leaders']}")
        if row["remote_extra_max_ms"] is not None:
            remote = ", ".join(f"{x:.2f}" for x in row["remote_extra_max_ms"])
            print(f"  of which followers on the other instance (through Redis): max per round "
                  f"{remote} ms")
        if row["dedup_events"] is not None:
            events = ", ".join(f"{k} {v}" for k, v in sorted(row["dedup_events"].items()))
            print(f"  dedup events (measured rounds, all instances): {events or 'none'}")
        if row["cache_status"] is not None:
            statuses = "; ".join(", ".join(f"{k} {v}" for k, v in sorted(s.items()))
                                 for s in row["cache_status"])
            print(f"  X-Cache-Status per round: {statuses}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100,
                        help="concurrent identical requests per round (100)")
    parser.add_argument("--delay", type=float, default=1.0,
                        help="the origin's latency in seconds (1.0)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a sidecar case misses the goal")
    args = parser.parse_args()
    if args.clients < 2 or args.rounds < 1 or args.delay < 0:
        parser.error("needs --clients >= 2, --rounds >= 1, --delay >= 0")

    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: the servers under test on core 0, the client on core 1",
              file=sys.stderr)
        return 2
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (apt-get install redis-server, or `make setup`); "
              "the sidecar's cluster dedup needs it", file=sys.stderr)
        return 2
    nginx_bin = which("nginx", "/usr/sbin/nginx")
    if nginx_bin is None:
        print("SKIP nginx proxy_cache_lock: nginx is not installed (apt-get install nginx); "
              "measuring the sidecar alone")

    os.sched_setaffinity(0, {1})  # the client; the servers are started with taskset -c 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    try:
        cases = run(args.clients, args.delay, args.rounds, nginx_bin, redis_bin)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, ValueError, KeyError,
            subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    load_end = loadavg()
    rows = [summary(case) for case in cases]
    report(rows, args, load_start, load_end)
    missed = [row["case"] for row in rows if row["verdict"] == "MISSED"]
    print(f"\ngoal (every follower within {GOAL_MS:g} ms of the leader, one upstream call): "
          + (f"MISSED by {', '.join(missed)}" if missed else "met by the sidecar cases"))
    if args.json:
        args.json.write_text(json.dumps({
            "results": rows, "goal_ms": GOAL_MS, "clients": args.clients, "delay_s": args.delay,
            "rounds": args.rounds, "loadavg_start": load_start, "loadavg_end": load_end,
            "nginx": "measured" if nginx_bin else "not installed"}, indent=2) + "\n")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
