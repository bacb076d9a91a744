"""Process faults under load: a worker of `server.workers: 2` killed with SIGKILL, the sidecar
stopped (SIGTERM) and started again on the same port, the config reloaded a hundred times.

Clients keep sending requests the whole time, half of them on a fresh connection each (spread
over the workers by SO_REUSEPORT), half on keep-alive ones; the upstream answers with a body
derived from the URL, and every body is checked. What must hold (docs/architecture.md
"Processes" and "Reload"): a killed worker costs only the requests it had in hand, the other
serves on and the supervisor starts a replacement; a restart costs connection errors at most,
never a wrong body; a reload costs nothing at all.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import SidecarProcess, free_port, make_config, until, write_config
from test_faults_upstream import settled
from test_lifecycle import readyz, wait_exit, wait_gone, worker_views

StartProcess = Callable[..., SidecarProcess]
TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class Echo:
    url: str


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    """An upstream whose body names the request target, and which says which Host it saw."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="echo " + request.path_qs,
                            headers={"X-Seen-Host": request.host})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Echo(f"http://127.0.0.1:{port}")
    await runner.cleanup()


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: the request raised
    right: bool  # the body is the one for this URL
    error: str = ""
    seen_host: str = ""


class Load:
    """`loops` clients sending GETs back to back until stopped (even loops: a fresh connection
    per request; odd ones: keep-alive), each to a URL of its own."""

    def __init__(self, url: str, loops: int = 8, paths: tuple[str, ...] = ("/echo",)) -> None:
        self.url = url
        self.loops = loops
        self.paths = paths
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.loops)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, index: int) -> None:
        connector = aiohttp.TCPConnector(force_close=index % 2 == 0)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                target = f"{self.paths[n % len(self.paths)]}/{index}/{n}?n={n}"
                started = time.monotonic()
                try:
                    async with session.get(self.url + target) as response:
                        body = await response.read()
                        self.outcomes.append(Outcome(
                            started, time.monotonic(), response.status,
                            body == b"echo " + target.encode(),
                            seen_host=response.headers.get("X-Seen-Host", "")))
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    self.outcomes.append(Outcome(started, time.monotonic(), None, False,
                                                 repr(exc)))
                    await asyncio.sleep(0.01)  # a refused connection comes back at once

    def answered(self, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and o.started >= since]

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is None]

    def assert_bodies_right(self) -> None:
        """Whatever was answered was answered right: 200 with the body of its own URL."""
        wrong = [o for o in self.answered() if o.status != 200 or not o.right]
        assert wrong == [], wrong[:5]

    async def wait_answered(self, count: int, since: float, timeout: float = 10) -> None:
        await until(lambda: asyncio.sleep(0, len(self.answered(since)) >= count), timeout)


@pytest.mark.slow
async def test_a_worker_killed_under_load_costs_only_its_requests_in_hand(
        sidecar_process: StartProcess, echo: Echo, redis_url: str) -> None:
    proc = sidecar_process(make_config(echo.url, redis_url, server={"workers": 2}))
    views = await worker_views(proc.admin_url, lambda v: len(v) == 2)
    victim, survivor = sorted(views)
    async with Load(proc.url) as load:
        await load.wait_answered(100, 0.0)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await wait_gone({victim}, 5)
        # The survivor takes every new connection meanwhile; then a replacement joins.
        await load.wait_answered(200, killed + 1.0)
        views = await worker_views(proc.admin_url, lambda v: len(v) == 2 and victim not in v,
                                   timeout=20)
        replaced = time.monotonic()
        await load.wait_answered(100, replaced)
    assert survivor in views
    load.assert_bodies_right()
    # Only requests the victim had in hand (or in its accept queue, or on a keep-alive
    # connection to it) failed: a few per client loop at most, none started a while after the
    # kill (the kernel closes a killed process's sockets as it dies).
    failed = load.failed()
    assert len(failed) <= 2 * load.loops, failed
    assert all(o.started < killed + 1.0 for o in failed), failed
    assert proc.process.poll() is None


@pytest.mark.slow
async def test_a_restart_under_load_costs_connection_errors_never_a_wrong_body(
        sidecar_process: StartProcess, echo: Echo, redis_url: str) -> None:
    config = make_config(echo.url, redis_url, server={"shutdown_grace": "2s"})
    first = sidecar_process(config)
    async with Load(first.url) as load:
        await load.wait_answered(100, 0.0)
        terminated = time.monotonic()
        first.signal(signal.SIGTERM)
        returncode, _ = await wait_exit(first, 10)
        assert returncode == 0
        second = await asyncio.to_thread(sidecar_process, config, "again.yaml")
        assert second.port == first.port
        started = time.monotonic()
        await load.wait_answered(100, started)
    load.assert_bodies_right()
    # From the stop until the second process listens the port refuses connections (and keep-
    # alive connections are closed): the clients see that, and only then.
    failed = load.failed()
    assert failed, "no request fell between the two processes"
    assert all(o.ended > terminated and o.started < started for o in failed), failed[:5]


def reload_variant(echo: Echo, redis_url: str, variant: int) -> dict[str, Any]:
    """Two valid configs: B replaces the upstream pool (other timeout), sends the upstream's
    own Host, and adds a route; both cache and coalesce /cached/**."""
    routes = [
        {"name": "cached", "match": {"path": "/cached/**"}, "upstream": "app",
         "cache": {"ttl": "1s"}, "dedup": {}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    if variant:
        routes.insert(0, {"name": "extra", "match": {"path": "/extra/**"}, "upstream": "app",
                          "timeout": "4s"})
    config = make_config(echo.url, redis_url, routes=routes,
                         server={"watch_config": False})
    config["upstreams"]["app"].update(timeout=f"{5 + variant}s",
                                      preserve_host=not variant)
    return config


@pytest.mark.slow
async def test_a_hundred_reloads_under_load_fail_no_request(
        sidecar_process: StartProcess, echo: Echo, redis_url: str) -> None:
    configs = [reload_variant(echo, redis_url, variant) for variant in (0, 1)]
    for config in configs[1:]:  # the same listeners
        config["server"] = configs[0]["server"]
    proc = sidecar_process(configs[0])
    paths = ("/echo", "/cached", "/extra")
    outcomes: list[Outcome] = []
    descriptors: list[int] = []
    async with aiohttp.ClientSession() as admin:
        for half in range(2):  # 50 reloads, twice: a leak per reload would show between them
            async with Load(proc.url, paths=paths) as load:
                await load.wait_answered(50, 0.0)
                for n in range(50 * half + 1, 50 * half + 51):
                    write_config(proc.config_path, configs[n % 2])
                    proc.signal(signal.SIGHUP)

                    async def reloaded(n: int = n) -> bool:
                        return bool((await readyz(admin, proc.admin_url))["reloads"]["ok"] >= n)

                    await until(reloaded, 10)
                await load.wait_answered(50, time.monotonic())
            outcomes += load.outcomes
            assert load.failed() == []
            load.assert_bodies_right()
            descriptors.append(await settled(proc.process.pid))
        assert (await readyz(admin, proc.admin_url))["reloads"] == {"ok": 100, "error": 0}
    # The pools the reloads replaced closed their connections: nothing piles up (the rest
    # varies with how many connections the load needed at its peak).
    assert descriptors[1] <= descriptors[0] + 10, descriptors
    # Both variants served: the upstream saw the client's Host, and its own.
    assert {o.seen_host for o in outcomes} == {
        proc.url.removeprefix("http://"), echo.url.removeprefix("http://")}
