"""Soak test: mixed traffic against a real sidecar for minutes while faults are injected on a
schedule, then invariants checked.

Why: the unit and fault tests look at one failure at a time, for seconds. Leaks (memory, file
descriptors), lost or doubled jobs, wrong bodies and errors that only show when faults land on
real traffic need minutes of both. This checks correctness and stability, not throughput: the
load is moderate (--rate requests/s in all) so that it runs on a 2-core machine shared with
other work, and the latency-driven parts have generous bounds.

What it starts (each stopped on exit, on error, on Ctrl-C or SIGTERM, and killed with it):
  redis-server  on a free port, appendonly yes + appendfsync always: a SIGKILLed server started
                again on the same directory keeps every acknowledged write (queued jobs); its
                files on tmpfs (/dev/shm) when there is one, so that a disk shared with other
                work does not stall it (see Processes)
  origin        this file with `--origin PORT`: an aiohttp app whose every body is derived
                from the URL (SHAKE-256 of path+query, of a size the path picks), so a client
                can check any 200 byte for byte; POST /echo/* answers the request body; it
                counts how often each URL ran (GET /_stats)
  sidecar       `python -m sidecar run -c soak.yaml` with `server.workers: 2` (a supervisor
                and two workers), routes: /c/** cached, /slow/** coalesced (dedup, cluster
                scope; the origin takes 200 ms), /jobs/** offloaded (POST), /flaky/** (the
                origin answers 503 one time in five and resets the connection one in twenty;
                retry and a breaker), /echo/** plain pass-through (POST; a rate limit whose
                burst carries the config generation, to see reloads land)

Traffic: --clients concurrent clients (aiohttp, one asyncio loop), each picking by weight:
hit (a hot URL of the cached route), miss (a unique URL there), coalesced (8 identical GETs
at once), offload (POST a unique job, poll it to its end, fetch its result), flaky (GET a
unique URL), echo (POST a random body). Every exchange is recorded.

Faults, one every 30 s (compressed so that each kind happens at least once in a short run),
in this cycle: redis_stop (SIGSTOP 3 s, SIGCONT), worker_kill (SIGKILL the youngest worker;
the supervisor starts another), redis_kill (SIGKILL, started again on the same port and
directory), reload (the config rewritten with the next generation, SIGHUP), origin_pause
(SIGSTOP 2 s: route timeouts of 1.5 s answer 504, the breaker acts).

Checks: every response classified; the only failures allowed are a 5xx on the flaky route, a
503 job_queue_unavailable during a Redis outage, a connection error during a worker kill and a
504 during the origin pause (each fault's window plus 3 s); every 200 body byte-identical to
the origin's; every job answered 202 completed exactly once from the client's view, with the
right body, still there at the end (origin runs > 1 are reported: jobs run at least once);
each fault recovered from (Redis ready again, the worker replaced, the reload seen, the
origin answering); cache hits, coalescing and retries doing their work; RSS and open fds of
the sidecar's process tree flat after the warm-up (median of the last 20% of the samples
against the 20% after the warm-up; processes that lived through both are also compared alone,
as a restarted worker starts small). Connections are told apart from the other fds: the
clients' follow the client, and the pools' to Redis and the origin follow the load, so they
are held to a bound instead (Sample.other_fds, pool_check). It also records when the origin's
and its own event loops stalled and when Redis was slow to answer a PING: the machine's
hiccups, told apart from the sidecar's.

Exit status: 0 every check holds, 1 a check failed, 2 the harness itself failed (a process
that does not start, a missing redis-server). On failure the working directory (logs,
config, the report) is kept and named.

    .venv/bin/python loadtests/soak.py [--duration 10m] [--clients 24] [--rate 150]
        [--json FILE] [--seed N] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from common import (  # loadtests/bench is not a package: on sys.path above
    HarnessError,
    free_port,
    loadavg,
    on_signal,
    redis_args,
    redis_ping,
    spawn,
    stop,
    tail,
    wait_for_port,
    which,
)

from sidecar.core.units import parse_duration

KINDS = ("hit", "miss", "coalesced", "offload", "flaky", "echo")
WEIGHTS = (30, 14, 8, 10, 18, 20)
FAULTS = ("redis_stop", "worker_kill", "redis_kill", "reload", "origin_pause")
REDIS_FAULTS = ("redis_stop", "redis_kill")
# The steps recorded, and the status each one expects.
OK_STATUS = {"hit": 200, "miss": 200, "coalesced": 200, "flaky": 200, "echo": 200,
             "offload_submit": 202, "offload_poll": 200, "offload_result": 200,
             "verify_status": 200, "verify_result": 200}

HOT_URLS = 16
BURST = 8  # identical GETs per coalesced group
SLOW_S = 0.2  # the origin's latency on /slow/
FLAKY_503, FLAKY_RESET = 0.20, 0.05
ROUTE_TIMEOUT = "1500ms"  # below the origin pause, so that the pause shows as 504s
REDIS_STOP_S, ORIGIN_STOP_S = 3.0, 2.0
FAULT_EVERY_S = 30.0
GRACE_S = 3.0  # after a fault is lifted, its failures are still expected this long
STALL_S = 0.25  # an event loop this late is recorded (the machine is shared)
RECOVERY_S = 30.0  # a fault not recovered from within this is a failed check
POLL_S = 0.3
JOB_DEADLINE_S = 90.0  # a job not over this long after its 202 is lost
GENERATION_BASE = 100_000  # echo's rate-limit burst: this + the config generation
RSS_ALLOW = (0.15, 20 * 1024)  # KiB: +15% or +20 MiB, whichever is larger
FD_ALLOW = (0.20, 16)
BODY_SIZES = {  # by path prefix: the origin's body size is one of these, picked by the URL
    "/c/hot/": (512, 4096, 65_536, 300_000),
    "/c/miss/": (256, 2048, 16_384),
    "/slow/": (1024, 65_536, 300_000),
    "/flaky/": (128, 2048),
    "/jobs/": (512, 8192),
}
ECHO_SIZES = (0, 100, 1000, 10_000, 64_000, 200_000)


# --- bodies: what the origin answers, which the client can compute too -----------------------


@functools.lru_cache(maxsize=256)
def expected_body(path_qs: str) -> bytes:
    """The origin's body for `path_qs`: SHAKE-256 output (no repeating pattern, so a cut,
    shifted or mixed body never matches), of a size picked from the path's prefix."""
    sizes = next((s for prefix, s in BODY_SIZES.items() if path_qs.startswith(prefix)), (64,))
    size = sizes[hashlib.sha256(path_qs.encode()).digest()[0] % len(sizes)]
    return hashlib.shake_256(path_qs.encode()).digest(size)


def job_delay(path: str) -> float:
    """How long the origin works on a job: 100-400 ms, fixed per job."""
    return 0.1 + hashlib.sha256(path.encode()).digest()[1] / 255 * 0.3


# --- the origin (a process of its own: `soak.py --origin PORT`) ------------------------------


async def watch_stalls(stalls: list[list[float]]) -> None:
    """Record when this process's event loop ran STALL_S or more late (when, by
    time.monotonic(), which is the same clock in every process; how late): starved of CPU or
    blocked, it answered nothing meanwhile. Tells a slow machine from a slow sidecar."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.05)
        late = time.monotonic() - before - 0.05
        if late >= STALL_S:
            stalls.append([before, round(late, 3)])


async def watch_redis(port: int, stalls: list[list[float]]) -> None:
    """PING Redis every 100 ms and record the answers that took STALL_S or more, as
    watch_stalls does: the injected stops show, and any other stall would too."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while True:
        start = time.monotonic()
        try:
            if reader is None or writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            async with asyncio.timeout(10):
                if not await reader.readline():
                    raise ConnectionResetError
        except (OSError, TimeoutError):
            if writer is not None:
                writer.close()
            reader = writer = None
        late = time.monotonic() - start
        if late >= STALL_S:
            stalls.append([start, round(late, 3)])
        await asyncio.sleep(0.1)


def run_origin(port: int) -> None:
    executions: Counter[str] = Counter()
    stalls: list[list[float]] = []
    rng = random.Random()

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        if path == "/_stats":
            return web.json_response({"executions": executions, "stalls": stalls})
        body = await request.read()
        if not path.startswith("/echo/"):
            executions[path] += 1
        if path.startswith("/echo/"):
            return web.Response(body=body, content_type="application/octet-stream")
        if path.startswith("/slow/"):
            await asyncio.sleep(SLOW_S)
        elif path.startswith("/jobs/"):
            await asyncio.sleep(job_delay(path))
        elif path.startswith("/flaky/"):
            roll = rng.random()
            if roll < FLAKY_RESET:
                return reset(request)
            if roll < FLAKY_RESET + FLAKY_503:
                return web.Response(status=503, text="flaky")
        return web.Response(body=expected_body(path), content_type="application/octet-stream")

    def reset(request: web.Request) -> web.StreamResponse:
        """Close the connection with a TCP RST (SO_LINGER 0), no response at all."""
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if transport is not None:
            transport.abort()
        return web.Response(status=204)  # never sent: the transport is gone

    async def watching(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch_stalls(stalls))
        yield
        task.cancel()

    app = web.Application(client_max_size=4 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.cleanup_ctx.append(watching)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                handle_signals=True, loop=uvloop.new_event_loop())


# --- the processes ----------------------------------------------------------------------------


@dataclass
class Ports:
    public: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    redis: int = field(default_factory=free_port)
    origin: int = field(default_factory=free_port)


def sidecar_config(ports: Ports, workdir: Path, generation: int) -> dict[str, Any]:
    origin = {"url": f"http://127.0.0.1:{ports.origin}", "timeout": ROUTE_TIMEOUT,
              "connect_timeout": "1s", "idle_timeout": "10s"}
    return {
        "server": {"listen": f"127.0.0.1:{ports.public}",
                   "admin_listen": f"127.0.0.1:{ports.admin}", "workers": 2,
                   "shutdown_grace": "5s", "watch_config": False,
                   "state_dir": str(workdir / "state")},
        "redis": {"url": f"redis://127.0.0.1:{ports.redis}/0", "health_interval": "500ms"},
        "upstreams": {"origin": origin},
        "log": {"access": False, "level": "warning"},
        "queues": {"soak": {"concurrency": 8}},
        "jobs": {"visibility_timeout": "6s", "sweep_interval": "2s"},
        "routes": [
            {"name": "cached", "match": {"path": "/c/**", "methods": ["GET", "HEAD"]},
             "upstream": "origin", "cache": {"ttl": "30s", "memory": {"max_bytes": "4MiB"}}},
            {"name": "coalesced", "match": {"path": "/slow/**", "methods": ["GET"]},
             "upstream": "origin", "dedup": {"scope": "cluster"}},
            {"name": "offloaded", "match": {"path": "/jobs/**", "methods": ["POST"]},
             "upstream": "origin",
             "offload": {"queue": "soak", "attempts": 10, "backoff": "1s", "timeout": "10s",
                         "result_ttl": "1h"}},
            {"name": "flaky", "match": {"path": "/flaky/**", "methods": ["GET"]},
             "upstream": "origin",
             "retry": {"attempts": 2, "backoff": "50ms", "on": ["connect", "503"],
                       "budget": "50%"},
             "breaker": {"failures": 5, "reset": "2s", "scope": "cluster"}},
            {"name": "echo", "match": {"path": "/echo/**", "methods": ["POST"]},
             "upstream": "origin",
             "rate_limit": {"rate": "100000/s", "burst": GENERATION_BASE + generation,
                            "key": "route"}},
        ],
    }


class Processes:
    """redis-server, the origin and the sidecar, each started, signalled and stopped here.
    Everything is started from the main thread (see common.spawn)."""

    def __init__(self, workdir: Path, redis_bin: str) -> None:
        self.workdir = workdir
        self.redis_bin = redis_bin
        self.ports = Ports()
        self.config_path = workdir / "soak.yaml"
        self.generation = 0
        self.redis: subprocess.Popen[bytes] | None = None
        self.origin: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        # Redis's files on tmpfs when there is one: fsync'ing every write to a disk shared
        # with other work stalls Redis for a second now and then, and the sidecar rightly
        # answers 503 job_queue_unavailable meanwhile: outages nobody injected. A SIGKILLed
        # redis-server loses nothing there either (its writes are in the kernel's hands).
        shm = Path("/dev/shm")
        self.redis_dir = (Path(tempfile.mkdtemp(prefix="sidecar-soak-redis-", dir=shm))
                          if shm.is_dir() and os.access(shm, os.W_OK) else workdir / "redis")
        self.redis_dir.mkdir(exist_ok=True)

    def start_redis(self) -> None:
        self.redis = spawn(redis_args(self.redis_bin, self.redis_dir, self.ports.redis,
                                      appendonly=True), self.workdir / "redis.err")

    def start_origin(self) -> None:
        self.origin = spawn([sys.executable, __file__, "--origin", str(self.ports.origin)],
                            self.workdir / "origin.log")

    def write_config(self) -> None:
        config = sidecar_config(self.ports, self.workdir, self.generation)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1))  # JSON is YAML
        tmp.replace(self.config_path)  # atomic: a reload never reads half a file

    def start_sidecar(self) -> None:
        self.write_config()
        self.sidecar = spawn([sys.executable, "-m", "sidecar", "run", "-c",
                              str(self.config_path)], self.workdir / "sidecar.log",
                             cwd=self.workdir)

    def alive(self, process: subprocess.Popen[bytes] | None) -> bool:
        return process is not None and process.poll() is None

    def stop_all(self) -> None:
        for process, sig in ((self.sidecar, signal.SIGTERM), (self.origin, signal.SIGTERM),
                             (self.redis, signal.SIGTERM)):
            if self.alive(process):
                assert process is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot exit
                stop(process, sig)
        if self.redis_dir.parent != self.workdir:
            with contextlib.suppress(OSError):
                shutil.copy(self.redis_dir / "redis.log", self.workdir / "redis.log")
            shutil.rmtree(self.redis_dir, ignore_errors=True)


async def wait_redis(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(redis_ping, port):
        if time.monotonic() > deadline:
            raise HarnessError(f"redis-server does not answer on :{port} after {timeout:g}s")
        await asyncio.sleep(0.05)


# --- the sidecar's process tree: RSS and fds --------------------------------------------------


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None  # a zombie has no VmRSS


def start_ticks(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def is_worker(pid: int) -> bool:
    """The supervisor's workers are multiprocessing 'spawn' children; its other child is
    multiprocessing's resource tracker."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def workers(root: int) -> list[int]:
    return [pid for pid in process_tree(root) if pid != root and is_worker(pid)]


TCP_STATES = {"01": "established", "02": "syn-sent", "04": "fin-wait1", "05": "fin-wait2",
              "07": "close", "08": "close-wait", "09": "last-ack", "0B": "closing"}
CLIENT = "client connection"
POOLS = ("to redis (", "to origin (")  # connections to them, in any state


def tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket of this host."""
    sockets: dict[str, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                parts = line.split()
                sockets[parts[9]] = (int(parts[1].rsplit(":", 1)[1], 16),
                                     int(parts[2].rsplit(":", 1)[1], 16), parts[3])
    return sockets


def fd_kinds(pid: int, sockets: dict[str, tuple[int, int, str]],
             ports: Ports) -> Counter[str] | None:
    """The open fds of `pid` by kind: what a growing count is made of."""
    names = {ports.public: "public", ports.admin: "admin", ports.redis: "redis",
             ports.origin: "origin"}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    kinds: Counter[str] = Counter()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            info = sockets.get(target[8:-1])
            if info is None:
                kinds["socket (unix, udp)"] += 1
                continue
            local, remote, state = info
            if state == "0A":
                kinds["listener"] += 1
            elif local == ports.public and state == "01":
                kinds[CLIENT] += 1
            elif local in names:
                kinds[f"accepted on {names[local]} ({TCP_STATES.get(state, state)})"] += 1
            else:
                kinds[f"to {names.get(remote, remote)} ({TCP_STATES.get(state, state)})"] += 1
        elif target.startswith(("pipe:", "anon_inode:")):
            kinds[target.split(":")[0] + (target.split(":")[1] if "anon" in target else "")] += 1
        else:
            kinds["file"] += 1
    return kinds


@dataclass
class Sample:
    t: float
    rss: dict[int, int]  # pid -> KiB
    kinds: dict[int, Counter[str]]  # pid -> its open fds by kind

    @property
    def fds(self) -> dict[int, int]:
        return {pid: sum(kinds.values()) for pid, kinds in self.kinds.items()}

    @property
    def other_fds(self) -> dict[int, int]:
        """All but the connections, whose number follows the load: the clients' established
        ones (how many, and which worker holds them, since a killed worker's clients connect
        again to any, is the client's business) and the pools' to Redis and the origin, checked
        against a bound instead (`pooled`). A client connection the sidecar failed to close
        (close-wait) still counts here."""
        return {pid: sum(kinds.values()) - kinds[CLIENT] - self._pooled(kinds)
                for pid, kinds in self.kinds.items()}

    @property
    def pooled(self) -> dict[int, int]:
        """Connections to Redis and the origin. redis-py keeps every connection it ever needed
        at once (each Redis stall under load can add some for good, up to the concurrency),
        and those of a killed redis-server stay in close-wait at the bottom of its pool until
        a burst reaches down to them."""
        return {pid: self._pooled(kinds) for pid, kinds in self.kinds.items()}

    @staticmethod
    def _pooled(kinds: Counter[str]) -> int:
        return sum(n for kind, n in kinds.items() if kind.startswith(POOLS))


def sample(root: int, t: float, ports: Ports) -> Sample:
    rss: dict[int, int] = {}
    kinds: dict[int, Counter[str]] = {}
    sockets = tcp_sockets()
    for pid in process_tree(root):
        kib, fds = rss_kib(pid), fd_kinds(pid, sockets, ports)
        if kib is not None and fds is not None:
            rss[pid], kinds[pid] = kib, fds
    return Sample(t, rss, kinds)


# --- the client -------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    step: str
    t0: float
    t1: float
    status: int  # 0: no response
    error: str  # the sidecar's JSON "error" code; "conn:<exception>" or "timeout" without one


@dataclass
class JobRecord:
    path: str
    status_url: str
    result_url: str
    submitted: float
    last_status: str = "queued"
    results: list[bytes] = field(default_factory=list)  # sha256 of each result fetched
    wrong_bodies: int = 0


class Pacer:
    """Spaces requests --rate a second across every client: the load stays moderate whatever
    the sidecar's speed (a closed loop alone would run as fast as it can)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def take(self, n: int = 1) -> None:
        now = time.monotonic()
        self.next = max(self.next, now - 0.2) + n * self.interval  # at most 0.2 s of credit
        delay = self.next - now - n * self.interval
        if delay > 0:
            await asyncio.sleep(delay)


def error_code(status: int, body: bytes) -> str:
    if status < 400:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    return str(parsed.get("error", "")) if isinstance(parsed, dict) else ""


class Traffic:
    """The clients: each picks a kind by weight, runs it, records what it saw."""

    def __init__(self, session: aiohttp.ClientSession, base: str, rate: float,
                 clock: Callable[[], float], seed: int) -> None:
        self.session = session
        self.base = base
        self.pacer = Pacer(rate)
        self.clock = clock
        self.rng = random.Random(seed)
        self.stop_at = float("inf")
        self.outcomes: list[Outcome] = []
        self.ops: Counter[str] = Counter()
        self.mismatches: Counter[str] = Counter()
        self.mismatch_examples: list[str] = []
        self.hot_hits = 0
        self.miss_as_hit = 0
        self.followers = 0
        self.coalesced_paths: Counter[str] = Counter()  # path -> 200s received
        self.flaky_paths: set[str] = set()
        # echo: (t0, the config generation seen, X-Request-ID)
        self.generations: list[tuple[float, int, str]] = []
        self.jobs: dict[str, JobRecord] = {}
        self.jobs_refused = 0  # 503 job_queue_unavailable: not queued, by contract
        self.jobs_unanswered: set[str] = set()  # POST without an answer: queued or not
        self.harness_errors: list[str] = []

    # -- one exchange ------------------------------------------------------------------------

    async def exchange(self, step: str, method: str, path: str, body: bytes | None = None,
                       paced: bool = True) -> tuple[int, Any, bytes] | None:
        if paced:
            await self.pacer.take()
        t0 = self.clock()
        try:
            async with self.session.request(method, self.base + path, data=body) as response:
                data = await response.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            self.outcomes.append(Outcome(step, t0, self.clock(), 0,
                                         f"conn:{type(exc).__name__}"))
            return None
        except TimeoutError:
            self.outcomes.append(Outcome(step, t0, self.clock(), 0, "timeout"))
            return None
        except aiohttp.ClientError as exc:
            self.outcomes.append(Outcome(step, t0, self.clock(), 0,
                                         f"client:{type(exc).__name__}"))
            return None
        self.outcomes.append(Outcome(step, t0, self.clock(), response.status,
                                     error_code(response.status, data)))
        return response.status, response.headers, data

    def check_body(self, step: str, path: str, data: bytes, expected: bytes) -> bool:
        if data == expected:
            return True
        self.mismatches[step] += 1
        if len(self.mismatch_examples) < 10:
            self.mismatch_examples.append(f"{step} {path}: {len(data)} bytes, expected "
                                          f"{len(expected)}")
        return False

    async def get_checked(self, step: str, path: str) -> Any:
        """GET `path`; a 200 must carry the origin's body. Returns the headers of a 200."""
        answer = await self.exchange(step, "GET", path)
        if answer is None or answer[0] != 200:
            return None
        self.check_body(step, path, answer[2], expected_body(path))
        return answer[1]

    # -- the kinds ---------------------------------------------------------------------------

    async def hit(self) -> None:
        headers = await self.get_checked("hit", f"/c/hot/{self.rng.randrange(HOT_URLS)}")
        if headers is not None and "; hit" in headers.get("Cache-Status", ""):
            self.hot_hits += 1

    async def miss(self) -> None:
        headers = await self.get_checked("miss", f"/c/miss/{uuid.uuid4().hex}")
        if headers is not None and "; hit" in headers.get("Cache-Status", ""):
            self.miss_as_hit += 1  # a URL never asked for before cannot be in the cache

    async def coalesced(self) -> None:
        path = f"/slow/{uuid.uuid4().hex}"
        await self.pacer.take(BURST)  # one slot per request, taken at once: they go together
        answers = await asyncio.gather(*(self.get_checked_paced(path) for _ in range(BURST)))
        for headers in answers:
            if headers is not None:
                self.coalesced_paths[path] += 1
                self.followers += headers.get("X-Sidecar-Dedup") == "follower"

    async def get_checked_paced(self, path: str) -> Any:
        answer = await self.exchange("coalesced", "GET", path, paced=False)
        if answer is None or answer[0] != 200:
            return None
        self.check_body("coalesced", path, answer[2], expected_body(path))
        return answer[1]

    async def flaky(self) -> None:
        path = f"/flaky/{uuid.uuid4().hex}"
        self.flaky_paths.add(path)
        await self.get_checked("flaky", path)

    async def echo(self) -> None:
        path = f"/echo/{uuid.uuid4().hex}"
        body = self.rng.randbytes(self.rng.choice(ECHO_SIZES))
        t0 = self.clock()
        answer = await self.exchange("echo", "POST", path, body)
        if answer is None or answer[0] != 200:
            return
        self.check_body("echo", path, answer[2], body)
        policy = answer[1].get("RateLimit-Policy", "")
        with contextlib.suppress(ValueError):
            self.generations.append((t0, int(policy.split(";")[0]) - GENERATION_BASE,
                                     answer[1].get("X-Request-ID", "")))

    async def offload(self) -> None:
        key = uuid.uuid4().hex
        path = f"/jobs/{key}"
        answer = await self.exchange("offload_submit", "POST", path,
                                     json.dumps({"id": key}).encode())
        if answer is None:
            self.jobs_unanswered.add(path)
            return
        status, _, data = answer
        if status != 202:
            if status == 503 and error_code(status, data) == "job_queue_unavailable":
                self.jobs_refused += 1
            return
        try:
            info = json.loads(data)
            job = JobRecord(path, info["status_url"], info["result_url"], self.clock())
        except (ValueError, KeyError, TypeError):
            self.check_body("offload_submit", path, data, b"<a JSON job description>")
            return
        self.jobs[path] = job
        await self.follow(job)

    async def follow(self, job: JobRecord) -> None:
        """Poll to the job's end, then fetch its result once."""
        deadline = job.submitted + JOB_DEADLINE_S
        while self.clock() < deadline and job.last_status in ("queued", "running"):
            await asyncio.sleep(POLL_S)
            answer = await self.exchange("offload_poll", "GET", job.status_url)
            if answer is not None and answer[0] == 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    job.last_status = str(json.loads(answer[2])["status"])
        while self.clock() < deadline and job.last_status == "succeeded" and not job.results:
            if await self.fetch_result(job, "offload_result"):
                return
            await asyncio.sleep(POLL_S)

    async def fetch_result(self, job: JobRecord, step: str) -> bool:
        answer = await self.exchange(step, "GET", job.result_url,
                                     paced=step == "offload_result")
        if answer is None or answer[0] != 200:
            return False
        job.results.append(hashlib.sha256(answer[2]).digest())
        if not self.check_body(step, job.path, answer[2], expected_body(job.path)):
            job.wrong_bodies += 1
        return True

    async def verify_job(self, job: JobRecord) -> None:
        """At the end: the job is still there, succeeded, with the same result."""
        answer = await self.exchange("verify_status", "GET", job.status_url, paced=False)
        if answer is None or answer[0] != 200:
            job.last_status = f"gone ({answer[0] if answer else 'no answer'})"
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            job.last_status = str(json.loads(answer[2])["status"])
        if job.last_status == "succeeded":
            await self.fetch_result(job, "verify_result")

    # -- the clients -------------------------------------------------------------------------

    async def client(self) -> None:
        ops: dict[str, Callable[[], Awaitable[None]]] = {
            "hit": self.hit, "miss": self.miss, "coalesced": self.coalesced,
            "offload": self.offload, "flaky": self.flaky, "echo": self.echo}
        while self.clock() < self.stop_at:
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            self.ops[kind] += 1
            try:
                await ops[kind]()
            except Exception:  # a bug of this script, not the sidecar's: exit 2
                self.harness_errors.append(traceback.format_exc())
                if len(self.harness_errors) > 20:
                    raise


# --- faults -----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0  # when it was lifted (SIGCONT, restart, SIGHUP sent)
    recovered_s: float | None = None  # from `end` until the check after it passed
    ok: bool = False
    detail: str = ""

    def window(self) -> tuple[float, float]:
        return self.start, self.end + (self.recovered_s or 0.0) + GRACE_S


def schedule(duration: float, warmup: float, cooldown: float) -> list[tuple[float, str]]:
    """A fault every FAULT_EVERY_S from the warm-up to `cooldown` before the end, cycling
    through FAULTS; closer together in a short run, so that each kind happens once."""
    span = duration - warmup - cooldown
    count = max(len(FAULTS), int(span // FAULT_EVERY_S))
    every = span / count
    return [(warmup + i * every, FAULTS[i % len(FAULTS)]) for i in range(count)]


class Injector:
    def __init__(self, procs: Processes, probe: aiohttp.ClientSession,
                 clock: Callable[[], float], traffic: Traffic) -> None:
        self.procs = procs
        self.probe = probe  # a session that opens a connection per request: reaches any worker
        self.clock = clock
        self.traffic = traffic
        self.faults: list[Fault] = []
        self.reload_times: list[tuple[float, int]] = []  # (SIGHUP sent, generation)

    async def run(self, plan: list[tuple[float, str]]) -> None:
        for at, kind in plan:
            await asyncio.sleep(max(0.0, at - self.clock()))
            if self.clock() >= self.traffic.stop_at:
                return
            fault = Fault(kind, self.clock())
            self.faults.append(fault)
            try:
                await getattr(self, kind)(fault)
            except (OSError, HarnessError, aiohttp.ClientError) as exc:
                fault.detail = f"{fault.detail} {type(exc).__name__}: {exc}".strip()
            if not fault.end:
                fault.end = self.clock()
            print(f"  t={fault.start:6.1f}s {kind:<13} {'ok' if fault.ok else 'FAILED':<6} "
                  f"{fault.detail}", flush=True)

    async def recovered(self, fault: Fault, check: Callable[[], Awaitable[bool]]) -> None:
        deadline = self.clock() + RECOVERY_S
        while self.clock() < deadline:
            if await check():
                fault.recovered_s = self.clock() - fault.end
                fault.ok = True
                return
            await asyncio.sleep(0.1)
        fault.recovered_s = self.clock() - fault.end
        fault.detail += f"; not recovered after {RECOVERY_S:g}s"

    async def get_json(self, port: int, path: str) -> dict[str, Any] | None:
        try:
            async with self.probe.get(f"http://127.0.0.1:{port}{path}") as response:
                return dict(await response.json()) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def redis_ready(self) -> bool:
        """Both workers see Redis up: 8 answers in a row on fresh connections say so."""
        for _ in range(8):
            ready = await self.get_json(self.procs.ports.admin, "/readyz")
            if ready is None or ready.get("redis") != "up":
                return False
        return True

    # -- the kinds ---------------------------------------------------------------------------

    async def paused(self, fault: Fault, pid: int, seconds: float) -> None:
        """SIGSTOP `pid` for `seconds` (SIGCONT whatever happens), noted on `fault`."""
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        fault.end = self.clock()
        fault.detail = f"SIGSTOP {seconds:g}s"

    async def redis_stop(self, fault: Fault) -> None:
        redis = self.procs.redis
        assert redis is not None
        await self.paused(fault, redis.pid, REDIS_STOP_S)
        await self.recovered(fault, self.redis_ready)

    async def redis_kill(self, fault: Fault) -> None:
        redis = self.procs.redis
        assert redis is not None
        redis.kill()
        await asyncio.to_thread(redis.wait)
        self.procs.start_redis()  # the same port and directory: the AOF is read back
        await wait_redis(self.procs.ports.redis)
        fault.end = self.clock()
        fault.detail = "SIGKILL, restarted"
        await self.recovered(fault, self.redis_ready)

    async def worker_kill(self, fault: Fault) -> None:
        supervisor = self.procs.sidecar
        assert supervisor is not None
        before = workers(supervisor.pid)
        if not before:
            fault.detail = "no worker to kill"
            return
        victim = max(before, key=start_ticks)  # the youngest: one worker lives throughout
        os.kill(victim, signal.SIGKILL)
        fault.end = self.clock()
        fault.detail = f"SIGKILL worker {victim}"

        async def replaced() -> bool:
            new = [pid for pid in workers(supervisor.pid) if pid not in before]
            if not new:
                return False
            health = await self.get_json(self.procs.ports.admin, "/healthz")
            return health is not None and health.get("pid") in new

        await self.recovered(fault, replaced)

    async def reload(self, fault: Fault) -> None:
        supervisor = self.procs.sidecar
        assert supervisor is not None
        self.procs.generation += 1
        generation = self.procs.generation
        self.procs.write_config()
        os.kill(supervisor.pid, signal.SIGHUP)
        fault.end = self.clock()
        self.reload_times.append((fault.end, generation))
        fault.detail = f"SIGHUP, generation {generation}"

        async def applied() -> bool:
            for n in range(8):
                try:
                    async with self.probe.post(
                            f"{self.traffic.base}/echo/reload-probe-{generation}-{n}",
                            data=b"probe") as response:
                        policy = response.headers.get("RateLimit-Policy", "")
                except (aiohttp.ClientError, TimeoutError):
                    return False
                if policy.split(";")[0] != str(GENERATION_BASE + generation):
                    return False
            return True

        await self.recovered(fault, applied)

    async def origin_pause(self, fault: Fault) -> None:
        origin = self.procs.origin
        assert origin is not None
        await self.paused(fault, origin.pid, ORIGIN_STOP_S)

        async def answering() -> bool:
            probe = f"/c/miss/origin-probe-{uuid.uuid4().hex}"
            try:
                async with self.probe.get(self.traffic.base + probe) as response:
                    return response.status == 200 and await response.read() == (
                        expected_body(probe))
            except (aiohttp.ClientError, TimeoutError):
                return False

        await self.recovered(fault, answering)


# --- the analysis -----------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def overlaps(outcome: Outcome, faults: list[Fault], kinds: tuple[str, ...]) -> bool:
    for fault in faults:
        if fault.kind in kinds:
            start, end = fault.window()
            if outcome.t0 <= end and outcome.t1 >= start:
                return True
    return False


def classify(outcome: Outcome, faults: list[Fault]) -> str:
    """'ok', one of the expected failure classes, or 'unexpected'."""
    if outcome.status == OK_STATUS[outcome.step]:
        return "ok"
    if outcome.step == "flaky" and outcome.status >= 500:
        return "flaky_5xx"
    if (outcome.status == 503 and outcome.error == "job_queue_unavailable"
            and overlaps(outcome, faults, REDIS_FAULTS)):
        return "redis_outage_503"
    if outcome.error.startswith("conn:") and overlaps(outcome, faults, ("worker_kill",)):
        return "worker_kill_conn_error"
    if outcome.status == 504 and overlaps(outcome, faults, ("origin_pause",)):
        return "origin_pause_504"
    return "unexpected"


def describe(outcome: Outcome) -> str:
    return f"{outcome.step} {outcome.status or ''} {outcome.error}".replace("  ", " ").strip()


def median_of(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def flatness(samples: list[Sample], warmup: float, metric: str,
             allow: tuple[float, int]) -> dict[str, Any]:
    """Median of the last 20% of the samples after the warm-up against the first 20%, for the
    whole tree and for the processes alive in every one of those samples (a restarted worker
    starts small and would hide growth elsewhere in the total)."""
    post = [s for s in samples if s.t >= warmup]
    k = max(1, len(post) // 5)
    first, last = post[:k], post[-k:]
    steady = set.intersection(*(set(getattr(s, metric)) for s in first + last)) if post else set()
    result: dict[str, Any] = {"samples": len(post)}
    for name, pids in (("tree", None), ("long_lived", steady)):
        def total(s: Sample, pids: set[int] | None = pids) -> int:
            values: dict[int, int] = getattr(s, metric)
            return sum(v for pid, v in values.items() if pids is None or pid in pids)

        start = median_of([total(s) for s in first])
        end = median_of([total(s) for s in last])
        limit = start + max(start * allow[0], allow[1])
        result[name] = {"after_warmup": start, "end": end, "limit": limit, "ok": end <= limit,
                        "max": max((total(s) for s in post), default=0)}
    result["long_lived_pids"] = sorted(steady)
    return result


def fd_breakdown(samples: list[Sample], warmup: float, pids: list[int]) -> dict[str, Any]:
    """The fds of `pids` by kind, in the middle of the window after the warm-up and at the
    end: what a change is made of."""
    post = [s for s in samples if s.t >= warmup]
    if not post:
        return {}
    chosen = {"after_warmup": post[max(1, len(post) // 5) // 2], "end": post[-1]}
    return {name: {"t": round(s.t, 1), "kinds": dict(sum(
        (s.kinds.get(pid, Counter()) for pid in pids), Counter()).most_common())}
        for name, s in chosen.items()}


@dataclass
class Report:
    args: dict[str, Any]
    started: str
    loadavg_start: str
    loadavg_end: str = ""
    wall_s: float = 0.0
    requests: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    unexpected_examples: list[str] = field(default_factory=list)
    bodies: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    dedup: dict[str, Any] = field(default_factory=dict)
    flaky: dict[str, Any] = field(default_factory=dict)
    rss_kib: dict[str, Any] = field(default_factory=dict)
    fds: dict[str, Any] = field(default_factory=dict)
    other_fds: dict[str, Any] = field(default_factory=dict)  # but established connections
    pooled: dict[str, Any] = field(default_factory=dict)  # to Redis and the origin
    fd_kinds_long_lived: dict[str, Any] = field(default_factory=dict)
    # Each sample: t, RSS KiB of the tree and of its long-lived processes, the tree's fds, fds
    # but connections, pooled connections.
    series: list[list[float]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    # When the origin's and this script's event loops ran STALL_S or more late, and when Redis
    # took that long to answer a PING: [t, seconds].
    stalls: dict[str, list[list[float]]] = field(default_factory=dict)
    passed: bool = False


def analyse(report: Report, traffic: Traffic, injector: Injector, samples: list[Sample],
            executions: dict[str, int], warmup: float, client_limit: int) -> list[Check]:
    faults = injector.faults
    checks: list[Check] = []
    # Responses, by class.
    classes: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    per_step: Counter[str] = Counter()
    for outcome in traffic.outcomes:
        per_step[outcome.step] += 1
        cls = classify(outcome, faults)
        classes[cls] += 1
        if cls == "unexpected":
            unexpected[describe(outcome)] += 1
            if len(report.unexpected_examples) < 30:
                report.unexpected_examples.append(
                    f"{outcome.t0:.2f}-{outcome.t1:.2f}s {describe(outcome)}")
    report.requests = {"total": len(traffic.outcomes), "per_step": dict(per_step),
                       "operations_per_kind": dict(traffic.ops)}
    report.classes = dict(classes)
    report.unexpected = dict(unexpected.most_common())
    checks.append(Check("no unexpected responses", not unexpected,
                        "none" if not unexpected else ", ".join(
                            f"{k}: {v}" for k, v in unexpected.most_common(8))))
    # Bodies.
    report.bodies = {"mismatches": dict(traffic.mismatches),
                     "examples": traffic.mismatch_examples}
    checks.append(Check("every 200 body identical to the origin's",
                        not traffic.mismatches, "; ".join(traffic.mismatch_examples) or
                        f"{classes['ok']} answers compared"))
    checks += job_checks(report, traffic, executions)
    checks += feature_checks(report, traffic, executions)
    checks += fault_checks(report, traffic, injector)
    # Memory and fds.
    report.rss_kib = flatness(samples, warmup, "rss", RSS_ALLOW)
    report.fds = flatness(samples, warmup, "fds", FD_ALLOW)  # all of them: reported
    report.other_fds = flatness(samples, warmup, "other_fds", FD_ALLOW)
    report.fd_kinds_long_lived = fd_breakdown(samples, warmup, report.fds["long_lived_pids"])
    steady = set(report.rss_kib["long_lived_pids"])
    report.series = [[round(s.t, 1), sum(s.rss.values()),
                      sum(v for pid, v in s.rss.items() if pid in steady), sum(s.fds.values()),
                      sum(s.other_fds.values()), sum(s.pooled.values())] for s in samples]
    for name, data, scope, unit in (
            ("RSS", report.rss_kib, "tree", " KiB"),
            ("RSS", report.rss_kib, "long_lived", " KiB"),
            ("open fds but connections", report.other_fds, "tree", ""),
            ("open fds but connections", report.other_fds, "long_lived", "")):
        figures = data[scope]
        checks.append(Check(
            f"{name} flat after warm-up ({scope.replace('_', '-')})", figures["ok"],
            f"{figures['after_warmup']:.0f}{unit} -> {figures['end']:.0f}{unit} "
            f"(limit {figures['limit']:.0f}{unit}, {data['samples']} samples)"))
    checks.append(pool_check(report, samples, warmup, client_limit))
    return checks


def pool_check(report: Report, samples: list[Sample], warmup: float,
               client_limit: int) -> Check:
    """Connections to Redis and the origin stay within what the load can need at once: all
    `client_limit` requests in one worker, each holding up to 3 (a cache write's pipeline and
    read, a dedup lock and its wait), plus 32 for the job loops, heartbeats and subscriptions;
    twice that, as the pool of a killed redis-server lingers beside its replacement. A
    connection leaked per request, job or poll goes past it within seconds."""
    bound = 2 * (3 * client_limit + 32)
    post = [s for s in samples if s.t >= warmup]
    peak = max((n for s in post for n in s.pooled.values()), default=0)
    report.pooled = {**flatness(samples, warmup, "pooled", FD_ALLOW), "max_per_process": peak,
                     "bound_per_process": bound}
    return Check("connections to Redis and the origin bounded by the load", peak <= bound,
                 f"at most {peak} in a process (bound {bound}); the tree's "
                 f"{report.pooled['tree']['after_warmup']:.0f} after warm-up -> "
                 f"{report.pooled['tree']['end']:.0f} at the end")


def job_checks(report: Report, traffic: Traffic,
               executions: dict[str, int]) -> list[Check]:
    jobs = traffic.jobs
    completed = {path for path, j in jobs.items()
                 if j.last_status == "succeeded" and j.results and not j.wrong_bodies}
    lost = {path: job.last_status for path, job in jobs.items() if path not in completed}
    conflicting = [p for p, j in jobs.items() if len(set(j.results)) > 1]
    runs = {path: executions.get(path, 0) for path in jobs}
    duplicated = {path: n for path, n in runs.items() if n > 1}
    never_ran = [p for p in jobs if runs[p] == 0 and p not in lost]
    job_paths = {p for p in executions if p.startswith("/jobs/")}
    phantom = sorted(job_paths - set(jobs))
    phantom_unanswered = [p for p in phantom if p in traffic.jobs_unanswered]
    report.jobs = {
        "submitted": len(jobs), "completed": len(completed), "lost": len(lost),
        "lost_examples": dict(list(lost.items())[:10]),
        "duplicated": len(duplicated), "origin_runs_max": max(runs.values(), default=0),
        "conflicting_results": len(conflicting), "never_ran_at_origin": len(never_ran),
        "refused_503": traffic.jobs_refused, "submit_unanswered": len(traffic.jobs_unanswered),
        "ran_without_202": len(phantom), "ran_without_202_after_no_answer":
            len(phantom_unanswered),
        "ran_without_202_examples": phantom[:5],
    }
    return [
        Check("jobs: none lost, each completed with the right body", not lost and bool(jobs),
              f"{len(completed)}/{len(jobs)} completed" + (
                  f"; lost: {dict(list(lost.items())[:5])}" if lost else "")),
        Check("jobs: one result each (no two different results)", not conflicting,
              f"{len(conflicting)} with two results; {len(duplicated)} ran twice or more at "
              "the origin (at least once: reported, allowed)"),
        Check("jobs: every completed job ran at the origin", not never_ran,
              f"{len(never_ran)} completed without an origin run"),
    ]


def feature_checks(report: Report, traffic: Traffic,
                   executions: dict[str, int]) -> list[Check]:
    ok = Counter(o.step for o in traffic.outcomes if o.status == OK_STATUS[o.step])
    hit_ratio = traffic.hot_hits / ok["hit"] if ok["hit"] else 0.0
    report.cache = {"hot_answers": ok["hit"], "hot_hits": traffic.hot_hits,
                    "hot_hit_ratio": round(hit_ratio, 4), "misses_answered_as_hits":
                        traffic.miss_as_hit, "hot_origin_runs": sum(
                            n for p, n in executions.items() if p.startswith("/c/hot/"))}
    coalesced = sum(traffic.coalesced_paths.values())
    slow_runs = sum(executions.get(p, 0) for p in traffic.coalesced_paths)
    ratio = slow_runs / coalesced if coalesced else 1.0
    report.dedup = {"answers": coalesced, "groups": len(traffic.coalesced_paths),
                    "origin_runs": slow_runs, "runs_per_answer": round(ratio, 4),
                    "followers": traffic.followers}
    flaky_runs = sum(executions.get(p, 0) for p in traffic.flaky_paths)
    flaky_total = sum(1 for o in traffic.outcomes if o.step == "flaky")
    success = ok["flaky"] / flaky_total if flaky_total else 0.0
    report.flaky = {"requests": flaky_total, "ok": ok["flaky"], "ok_ratio": round(success, 4),
                    "origin_runs": flaky_runs}
    return [
        Check("cache: hot URLs mostly hits, unique URLs never", hit_ratio >= 0.5 and
              not traffic.miss_as_hit, f"hot hit ratio {hit_ratio:.1%} (>= 50%); "
              f"{traffic.miss_as_hit} unique URLs answered as hits"),
        Check("dedup: identical GETs coalesced", coalesced > 0 and ratio <= 0.5,
              f"{slow_runs} origin runs for {coalesced} answers ({ratio:.2f}, <= 0.5), "
              f"{traffic.followers} followers"),
        Check("flaky: retries hide most origin failures", success >= 0.8,
              f"{success:.1%} answered 200 (>= 80%; the origin fails "
              f"{FLAKY_503 + FLAKY_RESET:.0%} of calls), {flaky_runs} origin calls for "
              f"{flaky_total} requests"),
    ]


def fault_checks(report: Report, traffic: Traffic, injector: Injector) -> list[Check]:
    faults = injector.faults
    report.faults = [{**asdict(f), "start": round(f.start, 2), "end": round(f.end, 2)}
                     for f in faults]
    kinds = Counter(f.kind for f in faults)
    failed = [f"{f.kind} at {f.start:.1f}s: {f.detail}" for f in faults if not f.ok]
    # Each reload seen by every answer that started 5 s after it: none with an older config
    # (one that started just before the next reload may see that one's, a newer one).
    stale: list[str] = []
    times = injector.reload_times
    for i, (at, generation) in enumerate(times):
        until = times[i + 1][0] if i + 1 < len(times) else float("inf")
        stale += [f"t={t0:.1f}s generation {g} (reload {generation} at {at:.1f}s; request "
                  f"{request_id})" for t0, g, request_id in traffic.generations
                  if at + 5 < t0 < until and g < generation]
    # Every kind answered after the last fault's window.
    after = max((f.window()[1] for f in faults), default=0.0)
    late = {o.step for o in traffic.outcomes if o.t0 > after and o.status == OK_STATUS[o.step]}
    missing = [k for k in ("hit", "miss", "coalesced", "flaky", "echo", "offload_submit")
               if k not in late]
    return [
        Check("every fault kind injected", all(kinds[k] for k in FAULTS),
              ", ".join(f"{k} x{kinds[k]}" for k in FAULTS)),
        Check("every fault recovered from", not failed and bool(faults),
              "; ".join(failed) or f"{len(faults)} faults"),
        Check("reloads applied in every worker", not stale,
              f"{len(stale)} echo answers with an older config 5 s after a reload"
              + (f": {'; '.join(stale[:5])}" if stale else "")),
        Check("traffic flows after the last fault", not missing,
              "every kind answered" if not missing else f"no success for {missing}"),
    ]


# --- the run ----------------------------------------------------------------------------------


async def wait_sidecar(procs: Processes, probe: aiohttp.ClientSession) -> None:
    """Until both workers answer on the admin listener with Redis up."""
    assert procs.sidecar is not None
    deadline = time.monotonic() + 60
    seen: set[int] = set()
    while time.monotonic() < deadline:
        if not procs.alive(procs.sidecar):
            raise HarnessError(f"the sidecar exited ({procs.sidecar.returncode}):\n"
                               f"{tail(procs.workdir / 'sidecar.log')}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with probe.get(f"http://127.0.0.1:{procs.ports.admin}/readyz") as response:
                ready = await response.json()
            async with probe.get(f"http://127.0.0.1:{procs.ports.admin}/healthz") as response:
                health = await response.json()
            if ready.get("redis") == "up":
                seen.add(int(health["pid"]))
            if len(seen) >= 2 and seen <= set(workers(procs.sidecar.pid)):
                return
        await asyncio.sleep(0.1)
    raise HarnessError(f"the sidecar's two workers not ready after 60 s:\n"
                       f"{tail(procs.workdir / 'sidecar.log')}")


async def sampler(root: int, ports: Ports, clock: Callable[[], float], every: float,
                  samples: list[Sample], stop: asyncio.Event) -> None:
    while not stop.is_set():
        # /proc/net/tcp of a busy host is long: read in a thread, not in the clients' loop.
        samples.append(await asyncio.to_thread(sample, root, clock(), ports))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def progress(traffic: Traffic, samples: list[Sample], every: float,
                   stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        last = samples[-1] if samples else None
        rss = sum(last.rss.values()) / 1024 if last else 0.0
        fds = sum(last.fds.values()) if last else 0
        done = sum(1 for j in traffic.jobs.values() if j.results)
        print(f"  t={traffic.clock():6.1f}s requests {len(traffic.outcomes):>7}  jobs "
              f"{done}/{len(traffic.jobs)}  rss {rss:6.1f} MiB  fds {fds}  load {loadavg()}",
              flush=True)


async def soak(procs: Processes, args: argparse.Namespace, report: Report) -> None:
    duration: float = args.duration
    warmup = min(60.0, max(5.0, 0.15 * duration))
    cooldown = min(60.0, max(10.0, 0.10 * duration))
    plan = schedule(duration, warmup, cooldown)
    timeout = aiohttp.ClientTimeout(total=30)
    probe_connector = aiohttp.TCPConnector(force_close=True)
    # A bounded pool (aiohttp reuses its connections round robin, so it keeps as many as it
    # ever needed at once): it fills up in the warm-up and the sidecar's fds stay level.
    connector = aiohttp.TCPConnector(limit=2 * args.clients)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                     connector=connector) as session, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5),
                                  connector=probe_connector) as probe:
        procs.start_redis()
        await wait_redis(procs.ports.redis)
        procs.start_origin()
        await asyncio.to_thread(wait_for_port, procs.ports.origin)
        procs.start_sidecar()
        await wait_sidecar(procs, probe)
        assert procs.sidecar is not None
        print(f"sidecar pid {procs.sidecar.pid} (2 workers) :{procs.ports.public}, admin "
              f":{procs.ports.admin}; redis-server :{procs.ports.redis} (AOF, fsync always, in "
              f"{procs.redis_dir}); "
              f"origin :{procs.ports.origin}; workdir {procs.workdir}", flush=True)
        print(f"{duration:g} s of traffic, warm-up {warmup:g} s, {len(plan)} faults from "
              f"{plan[0][0]:.0f} s every {plan[1][0] - plan[0][0]:.1f} s", flush=True)

        t_start = time.monotonic()
        print(f"traffic from {time.strftime('%H:%M:%S')}.{int(time.time() % 1 * 1000):03d} "
              "(t=0 in the figures below)", flush=True)

        def clock() -> float:
            return time.monotonic() - t_start

        traffic = Traffic(session, f"http://127.0.0.1:{procs.ports.public}", args.rate, clock,
                          args.seed)
        traffic.stop_at = duration
        injector = Injector(procs, probe, clock, traffic)
        samples: list[Sample] = []
        stop = asyncio.Event()
        every = min(3.0, max(1.0, duration / 200))
        background = [asyncio.create_task(sampler(procs.sidecar.pid, procs.ports, clock,
                                                  every, samples, stop)),
                      asyncio.create_task(progress(traffic, samples,
                                                   max(10.0, duration / 20), stop))]
        client_stalls: list[list[float]] = []
        redis_stalls: list[list[float]] = []
        watchers = [asyncio.create_task(watch_stalls(client_stalls)),
                    asyncio.create_task(watch_redis(procs.ports.redis, redis_stalls))]
        clients = [asyncio.create_task(traffic.client()) for _ in range(args.clients)]
        faults = asyncio.create_task(injector.run(plan))
        await asyncio.sleep(duration)
        await faults
        stop.set()
        await asyncio.gather(*background)
        # Drain: the clients finish what they started (jobs are followed to their end).
        drain_s = JOB_DEADLINE_S + 30
        done, pending = await asyncio.wait(clients, timeout=drain_s)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        print(f"drained in {clock() - duration:.1f} s; verifying {len(traffic.jobs)} jobs",
              flush=True)
        limit = asyncio.Semaphore(8)

        async def verify(job: JobRecord) -> None:
            async with limit:
                await traffic.verify_job(job)

        await asyncio.gather(*(verify(job) for job in traffic.jobs.values()))
        async with probe.get(f"http://127.0.0.1:{procs.ports.origin}/_stats") as response:
            origin_stats = await response.json()
        executions = origin_stats["executions"]
        for watcher in watchers:
            watcher.cancel()
        report.stalls = {name: [[round(at - t_start, 2), late] for at, late in stalls]
                         for name, stalls in (("origin", origin_stats["stalls"]),
                                              ("client", client_stalls),
                                              ("redis", redis_stalls))}
        report.wall_s = round(clock(), 1)
        checks = analyse(report, traffic, injector, samples, executions, warmup,
                         connector.limit)
        checks.append(Check("the sidecar still runs", procs.alive(procs.sidecar),
                            f"supervisor pid {procs.sidecar.pid}"))
        report.checks = [asdict(c) for c in checks]
        report.harness_errors = traffic.harness_errors
        report.passed = all(c.ok for c in checks)


def print_report(report: Report) -> None:
    print(f"\nsoak report ({report.started}, {report.wall_s:g} s wall, load "
          f"{report.loadavg_start} -> {report.loadavg_end})")
    requests = report.requests
    print(f"requests: {requests['total']} in all")
    for step, count in sorted(requests["per_step"].items()):
        print(f"  {step:<16}{count:>9}")
    print("operations per kind: " + ", ".join(
        f"{k} {v}" for k, v in sorted(requests["operations_per_kind"].items())))
    print("responses by class:")
    for cls, count in sorted(report.classes.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:<24}{count:>9}")
    for what, count in report.unexpected.items():
        print(f"    unexpected: {what}: {count}")
    jobs = report.jobs
    print(f"jobs: submitted {jobs['submitted']}, completed {jobs['completed']}, lost "
          f"{jobs['lost']}, duplicated (origin ran > 1) {jobs['duplicated']}, conflicting "
          f"results {jobs['conflicting_results']}; refused (503) {jobs['refused_503']}, "
          f"POST unanswered {jobs['submit_unanswered']}, ran without a 202 "
          f"{jobs['ran_without_202']}")
    for name, data, scale, unit in (("RSS", report.rss_kib, 1024, " MiB"),
                                    ("fds", report.fds, 1, ""),
                                    ("fds but connections", report.other_fds, 1, ""),
                                    ("pooled connections", report.pooled, 1, "")):
        tree, steady = data["tree"], data["long_lived"]
        print(f"{name}: tree {tree['after_warmup'] / scale:.1f}{unit} after warm-up -> "
              f"{tree['end'] / scale:.1f}{unit} at the end (max {tree['max'] / scale:.1f}); "
              f"long-lived {steady['after_warmup'] / scale:.1f} -> {steady['end'] / scale:.1f}")
    for name, data in report.fd_kinds_long_lived.items():
        print(f"  fds of the long-lived processes, {name.replace('_', ' ')} (t={data['t']:g}s): "
              + ", ".join(f"{kind} {count}" for kind, count in data["kinds"].items()))
    print(f"cache: {report.cache}\ndedup: {report.dedup}\nflaky: {report.flaky}")
    for name, stalls in report.stalls.items():
        worst = sorted(stalls, key=lambda s: -s[1])[:3]
        what = "PINGs answered" if name == "redis" else "event loop"
        print(f"stalls >= {STALL_S:g} s, {name} ({what}): {len(stalls)}"
              + (f", longest at t={', '.join(f'{t:g}s ({late:g}s)' for t, late in worst)}"
                 if stalls else ""))
    print("faults:")
    for fault in report.faults:
        recovered = fault["recovered_s"]
        print(f"  t={fault['start']:6.1f}s {fault['kind']:<13} lifted at {fault['end']:6.1f}s"
              f", recovered {recovered if recovered is None else round(recovered, 1)} s: "
              f"{'ok' if fault['ok'] else 'FAILED'} ({fault['detail']})")
    print("checks:")
    for check in report.checks:
        print(f"  {'PASS' if check['ok'] else 'FAIL'}  {check['name']}: {check['detail']}")
    print(f"verdict: {'PASS' if report.passed else 'FAIL'}")


def duration_arg(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < 45:
        raise argparse.ArgumentTypeError("at least 45s: room for one fault of each kind")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=duration_arg, default=600.0,
                        help="traffic time, with a unit: 60s, 10m (10m)")
    parser.add_argument("--clients", type=int, default=24, help="concurrent clients (24)")
    parser.add_argument("--rate", type=float, default=150.0,
                        help="requests per second, all clients together (150)")
    parser.add_argument("--seed", type=int, default=None, help="the traffic mix's seed")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (logs, config) even when it passes")
    parser.add_argument("--origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.origin is not None:
        run_origin(args.origin)
        return 0
    if args.clients < 1 or args.rate <= 0:
        parser.error("needs --clients >= 1 and --rate > 0")
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (`make setup` installs it)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    report = Report(args={k: str(v) for k, v in vars(args).items() if k != "origin"},
                    started=time.strftime("%Y-%m-%d %H:%M:%S"), loadavg_start=loadavg())
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    procs = Processes(workdir, redis_bin)
    status = 2
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(soak(procs, args, report))
        status = 0 if report.passed and not report.harness_errors else 1
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        status = 130
    except (HarnessError, OSError, RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"\nsoak harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
    finally:
        procs.stop_all()
    if report.harness_errors:
        print("harness errors (bugs of this script):\n" + "\n".join(report.harness_errors[:3]),
              file=sys.stderr)
        status = 2
    report.loadavg_end = loadavg()
    if report.checks:
        print_report(report)
        (workdir / "report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    if status == 0 and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs, config and report kept in {workdir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
