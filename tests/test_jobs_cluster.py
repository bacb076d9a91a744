"""Offloaded jobs run by real `sidecar worker` processes sharing one Redis: crash recovery after
kill -9, no job lost while workers are killed at random, the queue's concurrency limit across
processes, priorities, and a graceful stop that hands the running jobs on at once.

The sidecar in front (in this test's loop) only enqueues (`jobs.workers: false`). The upstream
listens on one port per worker process, each worker's config naming its own port, so every
upstream call says which worker made it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from support import (
    InProcessSidecar,
    Origin,
    free_port,
    gather_limited,
    make_config,
    write_config,
)

pytestmark = pytest.mark.slow

QUEUE = "reports"
TERMINAL = ("succeeded", "failed", "cancelled")
Factory = Callable[..., Awaitable[InProcessSidecar]]


# -- the upstream: one port per worker --------------------------------------------------------


class WorkerOrigin(Origin):
    """support's scriptable Origin, listening on a port of its own for each worker process:
    the port a call arrives on names the worker that made it. Counts calls in flight (in all,
    and per worker, with their job ids) and the most ever in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.runner: web.AppRunner | None = None
        self.owner: dict[int, str] = {}  # local port -> worker name
        self.in_flight = 0
        self.peak = 0
        self.flying: dict[str, set[str]] = defaultdict(set)  # worker -> job ids in flight
        self.by_worker: Counter[str] = Counter()  # calls each worker made
        self.log: list[tuple[str, str, str]] = []  # (worker, job id, path) per call, in order

    async def listen(self, name: str) -> str:
        assert self.runner is not None
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.owner[port] = name
        return f"http://127.0.0.1:{port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        worker = self.owner.get(sockname[1], "front") if sockname else "?"
        job_id = request.headers.get("X-Sidecar-Job-Id", "")
        self.by_worker[worker] += 1
        self.log.append((worker, job_id, request.path))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.flying[worker].add(job_id)
        try:
            return await super()._handle(request)
        finally:
            self.in_flight -= 1
            self.flying[worker].discard(job_id)


# -- worker processes -------------------------------------------------------------------------


class WorkerProcess:
    """`python -m sidecar worker -c <config>`, logging (JSON lines) to a file."""

    def __init__(self, name: str, config_path: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "worker", "-c", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=config_path.parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.started_at = 0.0
        self.worker_id = ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, message: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.logs().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (message is None or event.get("msg") == message):
                found.append(event)
        return found

    def complaints(self) -> list[str]:
        """Log lines at warning or above, and anything that is not a JSON log line."""
        lines = []
        for line in self.logs().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                lines.append(line)
                continue
            if not isinstance(event, dict) or event.get("level") not in ("info", "debug"):
                lines.append(line)
        return lines

    async def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            started = self.events("job worker started")
            if started:
                self.worker_id = started[0]["worker_id"]
                self.started_at = time.monotonic()
                return
            if not self.alive or time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} did not start:\n{self.logs()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no chance to put anything back."""
        if self.alive:
            self.process.kill()
        self.process.wait()

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit code."""
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker {self.name} ignored SIGTERM:\n{self.logs()}")
            await asyncio.sleep(0.05)
        return int(self.process.returncode)


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    origin: WorkerOrigin
    front: InProcessSidecar
    config: dict[str, Any]
    client: aiohttp.ClientSession
    tmp_path: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    spawned: int = 0

    async def spawn(self) -> WorkerProcess:
        """Start one more `sidecar worker`, on an upstream port of its own."""
        name = f"w{self.spawned}"  # taken before the first await: spawns may overlap
        self.spawned += 1
        url = await self.origin.listen(name)
        config = {**self.config, "upstreams": {
            "app": {**self.config["upstreams"]["app"], "url": url}}}
        path = write_config(self.tmp_path / f"{name}.yaml", config)
        worker = WorkerProcess(name, path, self.tmp_path / f"{name}.log")
        self.workers.append(worker)
        await worker.wait_started()
        return worker

    async def submit(self, priority: int, name: str, body: bytes) -> str:
        url = f"{self.front.url}/jobs/p{priority}/{name}"
        async with self.client.post(url, data=body) as response:
            text = await response.text()
            assert response.status == 202, text
            job_id = json.loads(text)["id"]
            assert response.headers["Location"] == f"/_sidecar/jobs/{job_id}"
            return str(job_id)

    async def status(self, job_id: str) -> dict[str, Any]:
        async with self.client.get(f"{self.front.url}/_sidecar/jobs/{job_id}") as response:
            text = await response.text()
            assert response.status == 200, text
            return json.loads(text)  # type: ignore[no-any-return]

    async def result(self, job_id: str) -> tuple[int, bytes]:
        async with self.client.get(f"{self.front.url}/_sidecar/jobs/{job_id}/result") as r:
            return r.status, await r.read()

    async def stats(self) -> dict[str, Any]:
        async with self.client.get(self.front.admin_url + "/admin/stats") as response:
            assert response.status == 200
            return (await response.json())["jobs"]["queues"][QUEUE]  # type: ignore[no-any-return]

    async def wait_for(self, job_ids: Iterable[str], statuses: Iterable[str] = TERMINAL,
                       timeout: float = 30.0, interval: float = 0.1) -> dict[str, dict[str, Any]]:
        """Poll until every job is in one of `statuses`; their last views."""
        wanted = set(statuses)
        views: dict[str, dict[str, Any]] = {}
        pending = list(job_ids)
        deadline = time.monotonic() + timeout
        while pending:
            found = await gather_limited([self.status(j) for j in pending], 20)
            for job_id, view in zip(pending, found, strict=True):
                views[job_id] = view
            pending = [j for j in pending if views[j]["status"] not in wanted]
            if not pending:
                break
            if time.monotonic() > deadline:
                left = Counter(views[j]["status"] for j in pending)
                raise AssertionError(
                    f"{len(pending)} jobs not {'/'.join(sorted(wanted))} after {timeout}s: "
                    f"{dict(left)}, e.g. {views[pending[0]]}\nstats: {await self.stats()}\n"
                    + self.complaints())
            await asyncio.sleep(interval)
        return views

    def complaints(self) -> str:
        return "\n".join(f"[{w.name}] {line}" for w in self.workers for line in w.complaints())


def cluster_config(redis_url: str, *, concurrency: int, visibility: str = "2s",
                   attempts: int | dict[int, int] = 3,
                   priorities: Iterable[int] = (5,)) -> dict[str, Any]:
    routes = [
        {"name": f"p{p}", "match": {"path": f"/jobs/p{p}/**"}, "upstream": "app",
         "offload": {"queue": QUEUE, "priority": p, "backoff": "50ms",
                     "attempts": attempts if isinstance(attempts, int) else attempts[p],
                     "timeout": "60s"}}
        for p in priorities
    ]
    # The front's own upstream URL is never called: only the workers replay jobs.
    return make_config("http://127.0.0.1:9", redis_url, routes=routes,
                       queues={QUEUE: {"concurrency": concurrency}},
                       jobs={"workers": False, "visibility_timeout": visibility,
                             "sweep_interval": "1s"})


@pytest.fixture
async def cluster(
    sidecar_factory: Factory, redis_url: str, client: aiohttp.ClientSession, tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """`await cluster(concurrency=..., ...)`: the upstream, the enqueue-only sidecar in front,
    and no worker yet (`Cluster.spawn`)."""
    origin = WorkerOrigin()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin._handle)
    origin.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await origin.runner.setup()
    made: list[Cluster] = []

    async def make(**options: Any) -> Cluster:
        config = cluster_config(redis_url, **options)
        front = await sidecar_factory(config, "front.yaml")
        made.append(Cluster(origin, front, config, client, tmp_path))
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            for worker in each.workers:
                worker.kill()
            complaints = each.complaints()
            if complaints:
                print(f"\nworker log lines at warning or above:\n{complaints}")
        await origin.runner.cleanup()


def echo(origin: Origin, path: str, delay: Callable[[bytes, int], float]) -> None:
    """Answer `done: <request body>` after `delay(body, call number)` seconds."""

    async def handler(request: web.Request, n: int) -> web.Response:
        body = await request.read()
        await asyncio.sleep(delay(body, n))
        return web.Response(body=b"done: " + body, headers={"X-Call": str(n)})

    origin.script(path, handler)


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- 1. crash recovery ------------------------------------------------------------------------


async def test_a_job_whose_worker_is_killed_runs_again_on_another_worker(
        cluster: Callable[..., Awaitable[Cluster]]) -> None:
    # p5 jobs have 3 attempts; p7 jobs only one, so losing their worker fails them.
    c = await cluster(concurrency=2, visibility="2s", attempts={5: 3, 7: 1}, priorities=(5, 7))
    echo(c.origin, "/jobs/p5/report", lambda body, n: 3.0)
    echo(c.origin, "/jobs/p7/report", lambda body, n: 3.0)
    a = await c.spawn()
    job_id = await c.submit(5, "report", b"crash me")
    last_chance = await c.submit(7, "report", b"only once")
    await eventually(lambda: len(c.origin.flying["w0"]) == 2)  # both calls under way on A
    views = await c.wait_for([job_id, last_chance], statuses=["running"], timeout=5)
    assert {v["status"] for v in views.values()} == {"running"}
    a.kill()
    killed = time.monotonic()
    for job in (job_id, last_chance):
        assert (await c.status(job))["status"] == "running"  # no worker left to notice
    b = await c.spawn()
    views = await c.wait_for([job_id, last_chance], timeout=30)
    recovered = time.monotonic() - killed

    view = views[job_id]
    assert view["status"] == "succeeded", view
    assert view["attempts"] == 2
    assert view["error"] is None
    assert await c.result(job_id) == (200, b"done: crash me")
    assert [w for w, j, _ in c.origin.log if j == job_id] == ["w0", "w1"]
    finished = b.events("job finished")
    assert [(e["job_id"], e["outcome"], e["attempt"], e["worker_id"]) for e in finished] == [
        (job_id, "succeeded", 2, b.worker_id)]

    failed = views[last_chance]
    assert failed["status"] == "failed", failed
    assert failed["attempts"] == 1
    assert failed["error"] == ("the worker running this job stopped answering "
                               "(visibility timeout)")
    assert (await c.result(last_chance))[0] == 409
    assert [w for w, j, _ in c.origin.log if j == last_chance] == ["w0"]

    stats = await c.stats()
    assert stats["outcomes"]["requeued"] == 1
    assert stats["outcomes"]["succeeded"] == 1
    assert stats["outcomes"]["failed"] == 1
    assert stats["queued"] == stats["running"] == stats["waiting_retry"] == 0
    print(f"\ncrash recovery: succeeded {recovered:.1f}s after the kill (the call takes 3s; "
          f"worker B was up {b.started_at - killed:.1f}s after the kill)")
    # visibility 2s + sweep 1s + B's start + the 3s call: about 7s; room for a slow machine.
    assert recovered < 20


# -- 2. no job lost under random kills ---------------------------------------------------------


async def test_no_job_is_lost_while_workers_are_killed_at_random(
        cluster: Callable[..., Awaitable[Cluster]]) -> None:
    c = await cluster(concurrency=3, visibility="2s", attempts=10)
    per_body: Counter[bytes] = Counter()
    ids_seen: dict[bytes, set[str]] = defaultdict(set)

    async def handler(request: web.Request, n: int) -> web.Response:
        body = await request.read()
        per_body[body] += 1
        ids_seen[body].add(request.headers["X-Sidecar-Job-Id"])
        await asyncio.sleep(0.1 + (zlib.crc32(body) % 200) / 1000)  # 0.1 to 0.3 s
        return web.Response(body=b"done: " + body)

    c.origin.script("/jobs/p5/chaos", handler)
    await asyncio.gather(*(c.spawn() for _ in range(3)))
    began = time.monotonic()
    bodies = [f"job {i:03d}".encode() for i in range(100)]
    ids = await gather_limited([c.submit(5, "chaos", body) for body in bodies], 10)
    assert len(set(ids)) == 100

    rng = random.Random(2026)
    kills: list[tuple[str, int]] = []  # (victim, jobs it was calling the upstream for)
    cut_jobs: set[str] = set()

    async def chaos() -> None:
        for round_ in range(5):
            await asyncio.sleep(1.5)
            live = [w for w in c.workers if w.alive]
            # Every other kill hits a worker that is calling the upstream right now (if any):
            # those kills are sure to leave a running job behind.
            busy = [w for w in live if c.origin.flying[w.name]]
            victim = rng.choice(busy if round_ % 2 == 0 and busy else live)
            calling = set(c.origin.flying[victim.name])  # read and kill with no await between
            victim.kill()
            kills.append((victim.name, len(calling)))
            cut_jobs.update(calling)
            await c.spawn()

    chaos_task = asyncio.create_task(chaos())
    try:
        views = await c.wait_for(ids, timeout=60, interval=0.3)
        all_done = time.monotonic() - began
        await chaos_task
    finally:
        if not chaos_task.done():
            chaos_task.cancel()
    elapsed = time.monotonic() - began

    statuses = Counter(v["status"] for v in views.values())
    assert statuses == {"succeeded": 100}, (statuses, c.complaints())
    results = await gather_limited([c.result(job_id) for job_id in ids], 20)
    for body, job_id, (status, data) in zip(bodies, ids, results, strict=True):
        assert (status, data) == (200, b"done: " + body), job_id
        assert ids_seen[body] == {job_id}  # each request was replayed under its own job
        # one upstream call per attempt at most; a kill may end an attempt before its call
        assert 1 <= per_body[body] <= views[job_id]["attempts"], views[job_id]
    assert len(kills) == 5
    assert cut_jobs, kills  # the first kill always hits a worker in the middle of a call
    for job_id in cut_jobs:
        assert views[job_id]["attempts"] >= 2, (
            views[job_id], kills, [e for e in c.origin.log if e[1] == job_id],
            [(w.name, line) for w in c.workers for line in w.logs().splitlines()
             if job_id in line])
    calls = sum(per_body.values())
    assert calls >= 100
    stats = await c.stats()
    # The counters move just after the job's state, not with it: a kill in between (a window
    # of one Redis round trip) loses one count, so only a count above 100 would be wrong.
    assert 100 - len(kills) <= stats["outcomes"]["succeeded"] <= 100, stats
    assert stats["outcomes"]["failed"] == 0
    assert stats["queued"] == stats["running"] == stats["waiting_retry"] == 0
    rerun = sum(1 for v in views.values() if v["attempts"] > 1)
    print(f"\nchaos: kills {kills}; {calls} upstream calls for 100 jobs ({calls - 100} "
          f"duplicates), {rerun} jobs took more than one attempt, requeued by the sweep "
          f"{stats['outcomes']['requeued']}, retried {stats['outcomes']['retried']}; "
          f"all done after {all_done:.1f}s, test body {elapsed:.1f}s; "
          f"calls per worker {dict(c.origin.by_worker)}")


# -- 3. the concurrency limit holds across processes -------------------------------------------


async def test_the_queue_concurrency_holds_across_worker_processes(
        cluster: Callable[..., Awaitable[Cluster]]) -> None:
    c = await cluster(concurrency=5, visibility="2s")
    echo(c.origin, "/jobs/p5/counted", lambda body, n: 0.3)
    one, two = await asyncio.gather(c.spawn(), c.spawn())
    ids = await gather_limited([c.submit(5, "counted", b"%d" % i) for i in range(30)], 10)
    views = await c.wait_for(ids, timeout=40, interval=0.2)
    assert Counter(v["status"] for v in views.values()) == {"succeeded": 30}
    assert c.origin.calls["/jobs/p5/counted"] == 30
    # 10 loops across the two processes, 5 slots: the limit is reached and never passed.
    assert c.origin.peak == 5
    by_logs = {w.name: [e["job_id"] for e in w.events("job finished")] for w in (one, two)}
    assert sorted(by_logs["w0"] + by_logs["w1"]) == sorted(ids)
    for worker in (one, two):
        assert {e["worker_id"] for e in worker.events("job finished")} <= {worker.worker_id}
    assert c.origin.by_worker["w0"] == len(by_logs["w0"])
    assert c.origin.by_worker["w1"] == len(by_logs["w1"])
    print(f"\nconcurrency: peak {c.origin.peak}, jobs per worker "
          f"{ {k: len(v) for k, v in by_logs.items()} }")
    assert by_logs["w0"] and by_logs["w1"], by_logs  # both processes took part


# -- 4. priorities ----------------------------------------------------------------------------


async def test_lower_priority_numbers_run_first_once_the_worker_is_free(
        cluster: Callable[..., Awaitable[Cluster]]) -> None:
    c = await cluster(concurrency=1, visibility="2s", priorities=(1, 5, 9))
    release = asyncio.Event()
    order: list[str] = []

    async def blocker(request: web.Request, n: int) -> web.Response:
        await release.wait()
        return web.Response(text="first")

    async def record(request: web.Request, n: int) -> web.Response:
        order.append((await request.read()).decode())
        await asyncio.sleep(0.02)
        return web.Response(text="ok")

    c.origin.script("/jobs/p5/block", blocker)
    c.origin.script("/jobs/p1/job", record)
    c.origin.script("/jobs/p9/job", record)
    worker = await c.spawn()
    first = await c.submit(5, "block", b"")
    await c.wait_for([first], statuses=["running"], timeout=20)
    await eventually(lambda: c.origin.calls["/jobs/p5/block"] == 1)
    ids = []
    for i in range(5):
        ids.append(await c.submit(9, "job", f"p9-{i}".encode()))
        ids.append(await c.submit(1, "job", f"p1-{i}".encode()))
    # The worker knows every lane once each lane's saq worker reports in (its upkeep starts
    # as the lane is added).
    client = aioredis.Redis.from_url(c.config["redis"]["url"])
    try:
        keys = [f"saq:sidecar.{QUEUE}.p{p}:worker_info:{worker.worker_id}:sidecar.{QUEUE}.p{p}"
                for p in (1, 5, 9)]
        deadline = time.monotonic() + 20
        while await client.exists(*keys) < 3:
            assert time.monotonic() < deadline, "the worker did not take up every lane"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    await asyncio.sleep(0.3)
    assert order == []  # concurrency 1: nothing else started while the first job runs
    views = await c.wait_for(ids, statuses=["queued"], timeout=5)
    assert all(v["status"] == "queued" for v in views.values())
    release.set()
    views = await c.wait_for([first, *ids], timeout=20)
    assert {v["status"] for v in views.values()} == {"succeeded"}
    assert order == [f"p1-{i}" for i in range(5)] + [f"p9-{i}" for i in range(5)]


# -- 5. graceful stop -------------------------------------------------------------------------


async def test_a_worker_stopped_by_sigterm_hands_its_jobs_on_at_once(
        cluster: Callable[..., Awaitable[Cluster]]) -> None:
    c = await cluster(concurrency=2, visibility="30s")
    calls: Counter[bytes] = Counter()

    async def handler(request: web.Request, n: int) -> web.Response:
        body = await request.read()
        calls[body] += 1
        # The first attempt of each job would take 30 s; the second answers at once.
        await asyncio.sleep(30.0 if calls[body] == 1 else 0.2)
        return web.Response(body=b"done: " + body)

    c.origin.script("/jobs/p5/report", handler)
    a = await c.spawn()
    ids = [await c.submit(5, "report", b"graceful %d" % i) for i in range(2)]
    await eventually(lambda: len(c.origin.flying["w0"]) == 2)  # both running on A
    assert {v["status"] for v in (await c.wait_for(ids, ["running"])).values()} == {"running"}
    assert (await c.stats())["slots_in_use"] == 2
    stopping = time.monotonic()
    assert await a.terminate() == 0
    stop_took = time.monotonic() - stopping
    for job_id in ids:
        view = await c.status(job_id)
        assert view["status"] == "queued", view  # back in the queue, not "running" until swept
        assert view["attempts"] == 1
    put_back = a.events("job put back in its queue: this worker is stopping")
    assert sorted(e["job_id"] for e in put_back) == sorted(ids)
    assert not a.events("job finished")
    assert (await c.stats())["slots_in_use"] == 0  # A let its slots go, B needs them
    b = await c.spawn()
    views = await c.wait_for(ids, timeout=25)
    handed_on = time.monotonic() - b.started_at
    for i, job_id in enumerate(ids):
        assert views[job_id]["status"] == "succeeded", views[job_id]
        assert views[job_id]["attempts"] == 2
        assert await c.result(job_id) == (200, b"done: graceful %d" % i)
    assert sorted((w, j) for w, j, _ in c.origin.log) == sorted(
        [("w0", j) for j in ids] + [("w1", j) for j in ids])
    stats = await c.stats()
    assert stats["outcomes"]["requeued"] == 0  # not the sweep: the stopping worker put them back
    assert stats["outcomes"]["succeeded"] == 2
    print(f"\ngraceful stop: worker A exited {stop_took:.1f}s after SIGTERM; both jobs "
          f"succeeded {handed_on:.1f}s after worker B started")
    assert handed_on < 5.0  # not after the 30 s visibility timeout
