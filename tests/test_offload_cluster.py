"""Job workers as real processes (`sidecar worker`) sharing one Redis: crash recovery with
kill -9, no job lost under random kills, the cluster-wide concurrency limit, priorities and a
graceful stop. The sidecar in front only enqueues (`jobs.workers: false`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import InProcessSidecar, Origin, gather_limited, make_config, until, write_config

Factory = Callable[..., Awaitable[InProcessSidecar]]


class WorkerProcess:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "worker", "-c", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=config_path.parent)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finished_jobs(self) -> list[str]:
        return [json.loads(line)["job_id"] for line in self.logs().splitlines()
                if '"job finished"' in line]

    def wait_started(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while "job worker started" not in self.logs():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start:\n{self.logs()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[Path], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(config_path: Path) -> WorkerProcess:
        worker = WorkerProcess(config_path, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        worker.wait_started()
        return worker

    yield start
    for worker in started:
        worker.kill()


def cluster_config(origin: Origin, redis_url: str, *, concurrency: int,
                   visibility: str = "2s", attempts: int = 3) -> dict[str, Any]:
    routes = [
        {"name": f"p{priority}", "match": {"path": f"/api/p{priority}/**"}, "upstream": "app",
         "offload": {"queue": "reports", "priority": priority, "attempts": attempts,
                     "backoff": "50ms"}}
        for priority in (1, 5, 9)
    ]
    return make_config(origin.url, redis_url, routes=routes,
                       queues={"reports": {"concurrency": concurrency}},
                       jobs={"workers": False, "visibility_timeout": visibility,
                             "sweep_interval": "1s"})


async def start_cluster(factory: Factory, tmp_path: Path, config: dict[str, Any]
                        ) -> tuple[InProcessSidecar, Path]:
    sidecar = await factory(config)
    return sidecar, write_config(tmp_path / "worker.yaml", config)


async def submit(client: aiohttp.ClientSession, sidecar: InProcessSidecar, path: str,
                 body: bytes = b"{}") -> str:
    async with client.post(sidecar.url + path, data=body) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["status_url"])


async def state(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                url: str) -> dict[str, Any]:
    async with client.get(sidecar.url + url) as response:
        assert response.status == 200
        return await response.json()  # type: ignore[no-any-return]


async def result(client: aiohttp.ClientSession, sidecar: InProcessSidecar, url: str) -> bytes:
    async with client.get(sidecar.url + url + "/result") as response:
        assert response.status == 200, await response.text()
        return await response.read()


def slow_echo(origin: Origin, path: str, seconds: float,
              started: asyncio.Event | None = None) -> None:
    async def handler(request: web.Request, n: int) -> web.Response:
        body = await request.read()
        if started is not None:
            started.set()
        await asyncio.sleep(seconds)
        return web.Response(body=hashlib.sha256(body).hexdigest().encode())

    origin.script(path, handler)


# -- crash recovery -------------------------------------------------------------------------


async def test_a_job_whose_worker_is_killed_completes_on_another(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client, tmp_path: Path,
        workers) -> None:
    started = asyncio.Event()
    slow_echo(origin, "/api/p5/report", 3.0, started)
    sidecar, config_path = await start_cluster(
        sidecar_factory, tmp_path, cluster_config(origin, redis_url, concurrency=2))
    first = workers(config_path)
    url = await submit(client, sidecar, "/api/p5/report", b"the body")
    async with asyncio.timeout(10):
        await started.wait()
    assert (await state(client, sidecar, url))["status"] == "running"
    first.kill()  # SIGKILL mid-job
    workers(config_path)

    async def done() -> bool:
        return (await state(client, sidecar, url))["status"] == "succeeded"

    await until(done, timeout=30)
    final = await state(client, sidecar, url)
    assert final["attempts"] == 2
    assert await result(client, sidecar, url) == hashlib.sha256(b"the body").hexdigest().encode()
    assert origin.calls["/api/p5/report"] == 2


async def test_no_job_is_lost_while_workers_are_killed_at_random(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client, tmp_path: Path,
        workers) -> None:
    slow_echo(origin, "/api/p5/job", 0.5)
    sidecar, config_path = await start_cluster(
        sidecar_factory, tmp_path,
        cluster_config(origin, redis_url, concurrency=6, attempts=20))
    pool = [workers(config_path) for _ in range(3)]
    bodies = [f"job {i}".encode() for i in range(100)]
    urls = await gather_limited([submit(client, sidecar, "/api/p5/job", b) for b in bodies], 20)
    rng = random.Random(7)
    kills = 0
    for _ in range(5):
        await asyncio.sleep(1.5)
        victim = pool.pop(rng.randrange(len(pool)))
        victim.kill()
        kills += 1
        pool.append(await asyncio.to_thread(workers, config_path))

    async def all_over() -> bool:
        states = await gather_limited([state(client, sidecar, u) for u in urls], 20)
        return all(s["status"] in ("succeeded", "failed", "cancelled") for s in states)

    await until(all_over, timeout=60)
    states = await gather_limited([state(client, sidecar, u) for u in urls], 20)
    assert [s["status"] for s in states] == ["succeeded"] * 100
    results = await gather_limited([result(client, sidecar, u) for u in urls], 20)
    assert results == [hashlib.sha256(b).hexdigest().encode() for b in bodies]
    calls = origin.calls["/api/p5/job"]
    assert calls >= 100
    async with client.get(sidecar.admin_url + "/admin/stats") as response:
        outcomes = (await response.json())["jobs"]["queues"]["reports"]["outcomes"]
    assert outcomes["succeeded"] == 100
    assert outcomes["requeued"] >= 1  # the kills did hit running jobs
    print(f"{kills} kills: {calls} upstream calls for 100 jobs, "
          f"{outcomes['requeued']} jobs requeued")


# -- the cluster-wide concurrency limit -----------------------------------------------------


async def test_concurrency_holds_across_worker_processes(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client, tmp_path: Path,
        workers) -> None:
    in_flight = 0
    peak = 0

    async def counted(request: web.Request, n: int) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.3)
        finally:
            in_flight -= 1
        return web.Response(text="ok")

    origin.script("/api/p5/counted", counted)
    sidecar, config_path = await start_cluster(
        sidecar_factory, tmp_path, cluster_config(origin, redis_url, concurrency=5))
    one, two = workers(config_path), workers(config_path)
    urls = [await submit(client, sidecar, "/api/p5/counted") for _ in range(30)]

    async def all_done() -> bool:
        states = await gather_limited([state(client, sidecar, u) for u in urls], 10)
        return all(s["status"] == "succeeded" for s in states)

    await until(all_done, timeout=30)
    assert origin.calls["/api/p5/counted"] == 30
    assert peak == 5  # reached, never passed, with 10 loops across the two processes
    ran = (len(one.finished_jobs()), len(two.finished_jobs()))
    assert sum(ran) == 30
    assert min(ran) > 0, ran  # both processes took part


# -- priorities -----------------------------------------------------------------------------


async def test_lower_priority_numbers_run_first(sidecar_factory: Factory, origin: Origin,
                                                redis_url: str, client, tmp_path: Path,
                                                workers) -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def blocker(request: web.Request, n: int) -> web.Response:
        await release.wait()
        return web.Response(text="first")

    async def record(request: web.Request, n: int) -> web.Response:
        order.append((await request.read()).decode())
        return web.Response(text="ok")

    origin.script("/api/p5/block", blocker)
    origin.script("/api/p1/job", record)
    origin.script("/api/p9/job", record)
    sidecar, config_path = await start_cluster(
        sidecar_factory, tmp_path, cluster_config(origin, redis_url, concurrency=1))
    workers(config_path)
    first = await submit(client, sidecar, "/api/p5/block")
    await until(lambda: _status_is(client, sidecar, first, "running"))
    urls = []
    for i in range(4):
        urls.append(await submit(client, sidecar, "/api/p9/job", f"p9-{i}".encode()))
        urls.append(await submit(client, sidecar, "/api/p1/job", f"p1-{i}".encode()))
    await asyncio.sleep(0.5)  # both lanes known to the worker
    release.set()
    await until(lambda: _has_all(order, 8), timeout=20)
    assert order == [f"p1-{i}" for i in range(4)] + [f"p9-{i}" for i in range(4)]


async def _status_is(client: aiohttp.ClientSession, sidecar: InProcessSidecar, url: str,
                     status: str) -> bool:
    return (await state(client, sidecar, url))["status"] == status


async def _has_all(items: list[str], count: int) -> bool:
    return len(items) >= count


# -- graceful stop --------------------------------------------------------------------------


async def test_a_stopping_worker_puts_its_job_back_at_once(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client, tmp_path: Path,
        workers) -> None:
    started = asyncio.Event()
    slow_echo(origin, "/api/p5/report", 2.0, started)
    sidecar, config_path = await start_cluster(
        sidecar_factory, tmp_path,
        cluster_config(origin, redis_url, concurrency=2, visibility="30s"))
    first = workers(config_path)
    url = await submit(client, sidecar, "/api/p5/report", b"graceful")
    async with asyncio.timeout(10):
        await started.wait()
    first.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.process.wait, 10) == 0
    assert (await state(client, sidecar, url))["status"] == "queued"  # back, not "running"
    workers(config_path)
    began = time.monotonic()
    await until(lambda: _status_is(client, sidecar, url, "succeeded"), timeout=15)
    assert time.monotonic() - began < 10  # not after the 30 s visibility timeout
    assert await result(client, sidecar, url) == hashlib.sha256(b"graceful").hexdigest().encode()
    assert "put back in its queue" in first.logs()
