"""Lifecycle under traffic: hot reload, graceful shutdown, workers, Redis loss, embedded Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from support import (
    Backend,
    InProcessSidecar,
    RedisServer,
    SidecarProcess,
    free_port,
    make_config,
    until,
    write_config,
)

from sidecar.examples.backend import build_app

StartInProcess = Callable[..., Awaitable[InProcessSidecar]]
StartProcess = Callable[..., SidecarProcess]
TIMEOUT = aiohttp.ClientTimeout(total=10)


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
async def backend_b() -> AsyncIterator[Backend]:
    """A second example backend whose every response carries `X-Backend: b`."""
    app = build_app()

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Backend"] = "b"

    app.on_response_prepare.append(stamp)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Backend(f"http://127.0.0.1:{port}", port, app)
    await runner.cleanup()


def two_upstreams(backend: Backend, backend_b: Backend, redis_url: str,
                  routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    config = make_config(backend.url, redis_url, routes=routes, **sections)
    config["upstreams"]["b"] = {"url": backend_b.url, "timeout": "5s", "connect_timeout": "1s"}
    return config


DEFAULT_ROUTE = {"name": "default", "match": {"path": "/**"}, "upstream": "app"}
SEVEN_TO_B = {"name": "seven", "match": {"path": "/api/products/7"}, "upstream": "b"}
BROKEN_ROUTE = {"name": "broken", "match": {"path": "/broken/**"}, "upstream": "missing"}


class Traffic:
    """`loops` clients requesting `url` back to back until the block ends; records every outcome
    per loop as (status, X-Backend header), and every exception."""

    def __init__(self, session: aiohttp.ClientSession, url: str, loops: int = 10) -> None:
        self.session = session
        self.url = url
        self.results: list[list[tuple[int, str | None]]] = [[] for _ in range(loops)]
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                async with self.session.get(self.url, timeout=TIMEOUT) as response:
                    await response.read()
                    self.results[index].append((response.status, response.headers.get(
                        "X-Backend")))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.errors.append(repr(exc))

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(len(self.results))]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    @property
    def statuses(self) -> set[int]:
        return {status for loop in self.results for status, _ in loop}

    @property
    def count(self) -> int:
        return sum(len(loop) for loop in self.results)

    def labels(self) -> list[list[str | None]]:
        return [[label for _, label in loop] for loop in self.results]

    def assert_clean(self, minimum: int = 100) -> None:
        assert self.errors == []
        assert self.statuses == {200}
        assert self.count >= minimum, f"only {self.count} requests went through"


def assert_switched_once(traffic: Traffic) -> None:
    """Every loop saw the old backend, then (and from then on only) backend b."""
    for labels in traffic.labels():
        assert "b" in labels, "a client loop never saw the new route"
        switch = labels.index("b")
        assert switch > 0, "the new route served before the reload"
        assert set(labels[:switch]) == {None}
        assert set(labels[switch:]) == {"b"}, "the old route served again after the reload"


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` until true; return the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def readyz(session: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    async with session.get(admin_url + "/readyz", timeout=TIMEOUT) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def reload_counts(session: aiohttp.ClientSession, admin_url: str) -> dict[str, int]:
    counts: dict[str, int] = (await readyz(session, admin_url))["reloads"]
    return counts


def log_records(proc: SidecarProcess) -> list[dict[str, Any]]:
    records = []
    for line in proc.logs().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def _stat(path: Path) -> list[str] | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Any thread of the process still running. A zombie nobody reaped yet counts as gone, but
    a zombie leader whose other threads are still exiting (and holding its sockets) does not."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(fields is not None and fields[0] not in ("Z", "X")
               for fields in (_stat(thread / "stat") for thread in threads))


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
        errors="replace")


def parent_of(pid: int) -> int | None:
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return int(fields[1]) if fields is not None else None


async def wait_gone(pids: set[int], timeout: float) -> None:
    async def gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await wait_until(gone, timeout, f"processes {sorted(pids)} exit")


async def wait_exit(proc: SidecarProcess, timeout: float) -> tuple[int, float]:
    """Wait for the process without blocking this loop (the backend lives in it)."""
    started = time.monotonic()
    returncode = await asyncio.to_thread(proc.process.wait, timeout)
    proc.stopped = True
    return returncode, time.monotonic() - started


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: the connection reached the backlog of a listener that closed before
        # accepting it; closed all the same.
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def fresh_connections() -> aiohttp.ClientSession:
    """A session that opens a new TCP connection per request (spreads over SO_REUSEPORT)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 timeout=TIMEOUT)


# --- 1. reload with a valid config under traffic -----------------------------------------------


async def test_file_change_adds_route_under_traffic(
    sidecar_factory: StartInProcess, backend: Backend, backend_b: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    config = two_upstreams(backend, backend_b, redis_url, [DEFAULT_ROUTE])
    sidecar = await sidecar_factory(config)
    other = Traffic(client, sidecar.url + "/api/products/1")
    seven = Traffic(client, sidecar.url + "/api/products/7")
    async with other, seven:
        await asyncio.sleep(0.5)
        write_config(sidecar.config_path, {**config, "routes": [SEVEN_TO_B, DEFAULT_ROUTE]})
        await wait_until(lambda: _reloaded(client, sidecar.admin_url, ok=1), 3, "reload")
        await asyncio.sleep(0.5)
    for traffic in (other, seven):
        traffic.assert_clean()
    assert_switched_once(seven)
    assert {label for loop in other.labels() for label in loop} == {None}
    assert backend_b.calls("GET /api/products/7") > 0
    assert backend_b.calls("GET /api/products/1") == 0
    body = await readyz(client, sidecar.admin_url)
    assert body["routes"] == 2
    assert body["reloads"] == {"ok": 1, "error": 0}


async def _reloaded(session: aiohttp.ClientSession, admin_url: str, *, ok: int = 0,
                    error: int = 0) -> bool:
    counts = await reload_counts(session, admin_url)
    return counts["ok"] >= ok and counts["error"] >= error


async def test_sighup_switches_route_upstream_under_traffic(
    sidecar_process: StartProcess, backend: Backend, backend_b: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    config = two_upstreams(backend, backend_b, redis_url, [DEFAULT_ROUTE],
                           server={"watch_config": False})
    proc = sidecar_process(config)
    traffic = Traffic(client, proc.url + "/api/products/3", loops=20)
    async with traffic:
        await asyncio.sleep(0.5)
        switched = {**DEFAULT_ROUTE, "upstream": "b"}
        write_config(proc.config_path, {**config, "routes": [switched]})
        await asyncio.sleep(0.3)
        assert await reload_counts(client, proc.admin_url) == {"ok": 0, "error": 0}, (
            "watch_config is off: only the signal may reload")
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: _reloaded(client, proc.admin_url, ok=1), 3, "SIGHUP reload")
        await asyncio.sleep(0.5)
    traffic.assert_clean()
    assert_switched_once(traffic)
    assert backend.calls("GET /api/products/3") > 0
    assert backend_b.calls("GET /api/products/3") > 0
    assert any(r.get("msg") == "config reloaded" and r.get("reason") == "SIGHUP"
               for r in log_records(proc))


# --- 2. reload with an invalid config under traffic --------------------------------------------


async def test_invalid_file_change_keeps_old_config_under_traffic(
    sidecar_factory: StartInProcess, backend: Backend, backend_b: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    config = two_upstreams(backend, backend_b, redis_url, [DEFAULT_ROUTE])
    sidecar = await sidecar_factory(config)
    traffic = Traffic(client, sidecar.url + "/api/products/7", loops=20)
    async with traffic:
        await asyncio.sleep(0.3)
        # Would send /api/products/7 to b if it were (wrongly) applied.
        write_config(sidecar.config_path,
                     {**config, "routes": [SEVEN_TO_B, BROKEN_ROUTE, DEFAULT_ROUTE]})
        await wait_until(lambda: _reloaded(client, sidecar.admin_url, error=1), 3,
                         "rejected reload")
        await asyncio.sleep(0.5)
    traffic.assert_clean()
    assert {label for loop in traffic.labels() for label in loop} == {None}
    assert backend_b.calls("GET /api/products/7") == 0
    body = await readyz(client, sidecar.admin_url)
    assert body["reloads"] == {"ok": 0, "error": 1}
    assert body["routes"] == 1
    assert "unknown upstream 'missing'" in body["last_reload_error"]
    assert "routes[1] (broken).upstream" in body["last_reload_error"]

    # Fixing the file recovers, and clears the error.
    write_config(sidecar.config_path, {**config, "routes": [SEVEN_TO_B, DEFAULT_ROUTE]})
    await wait_until(lambda: _reloaded(client, sidecar.admin_url, ok=1), 3, "fixed reload")
    body = await readyz(client, sidecar.admin_url)
    assert body["reloads"] == {"ok": 1, "error": 1}
    assert body["last_reload_error"] is None
    async with client.get(sidecar.url + "/api/products/7") as response:
        assert response.status == 200
        assert response.headers["X-Backend"] == "b"


async def test_invalid_sighup_reload_logs_error_and_keeps_serving(
    sidecar_process: StartProcess, backend: Backend, backend_b: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    config = two_upstreams(backend, backend_b, redis_url, [DEFAULT_ROUTE],
                           server={"watch_config": False})
    proc = sidecar_process(config)
    traffic = Traffic(client, proc.url + "/api/products/7", loops=20)
    async with traffic:
        await asyncio.sleep(0.3)
        path = proc.config_path
        path.write_text(path.read_text().replace("upstream: app", "upstream: nope"))
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: _reloaded(client, proc.admin_url, error=1), 3,
                         "rejected reload")
        await asyncio.sleep(0.5)
    traffic.assert_clean()
    assert {label for loop in traffic.labels() for label in loop} == {None}
    body = await readyz(client, proc.admin_url)
    assert body["status"] == "ready"
    assert body["reloads"] == {"ok": 0, "error": 1}
    assert "unknown upstream 'nope'" in body["last_reload_error"]
    errors = [r for r in log_records(proc) if r.get("level") == "error"]
    assert len(errors) == 1, proc.logs()
    assert "previous config keeps serving" in errors[0]["msg"]
    assert errors[0]["reason"] == "SIGHUP"
    assert any("unknown upstream 'nope'" in problem for problem in errors[0]["problems"])
    assert proc.process.poll() is None


# --- 3. graceful shutdown ----------------------------------------------------------------------


async def test_sigterm_drains_requests_in_flight(
    sidecar_process: StartProcess, backend: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    proc = sidecar_process(make_config(backend.url, redis_url))
    in_flight = 10

    async def slow() -> tuple[int, Any]:
        async with client.get(proc.url + "/api/slow?delay=1.5", timeout=TIMEOUT) as response:
            return response.status, await response.json()

    tasks = [asyncio.create_task(slow()) for _ in range(in_flight)]

    async def all_upstream() -> bool:
        return backend.calls("GET /api/slow") == in_flight

    await wait_until(all_upstream, 3, "requests reach the backend")
    proc.signal(signal.SIGTERM)
    terminated = time.monotonic()
    await wait_until(lambda: connection_refused(proc.port), 1, "listener closes")
    assert not any(task.done() for task in tasks), "the listener closed only after the drain"
    assert proc.process.poll() is None

    results = await asyncio.gather(*tasks)
    assert results == [(200, {"slept": 1.5})] * in_flight
    returncode, _ = await wait_exit(proc, 10)
    assert returncode == 0
    assert time.monotonic() - terminated < 5, "exit within server.shutdown_grace (5s)"
    assert await connection_refused(proc.admin_port)
    assert backend.calls("GET /api/slow") == in_flight


async def test_sigterm_cuts_requests_beyond_shutdown_grace(
    sidecar_process: StartProcess, backend: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    proc = sidecar_process(make_config(backend.url, redis_url,
                                       server={"shutdown_grace": "500ms"}))
    async def slow() -> int:
        async with client.get(proc.url + "/api/slow?delay=6", timeout=TIMEOUT) as response:
            await response.read()
            return response.status

    task = asyncio.create_task(slow())

    async def upstream() -> bool:
        return backend.calls("GET /api/slow") == 1

    await wait_until(upstream, 3, "request reaches the backend")
    proc.signal(signal.SIGTERM)
    returncode, took = await wait_exit(proc, 5)
    assert returncode == 0
    assert 0.4 < took < 3, f"exit after the 0.5s grace, not after the request: {took:.2f}s"
    with pytest.raises(aiohttp.ClientError):
        await task


# --- 4. workers --------------------------------------------------------------------------------


async def worker_views(admin_url: str, want: Callable[[dict[int, dict[str, Any]]], bool],
                       timeout: float = 10.0) -> dict[int, dict[str, Any]]:
    """pid -> that worker's /readyz (+ worker id), gathered over fresh connections (each one
    lands on some worker; /healthz then /readyz on the same connection reach the same one)."""
    views: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = {}
        for _ in range(40):
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                                 timeout=TIMEOUT) as session:
                    async with session.get(admin_url + "/healthz") as response:
                        health = await response.json()
                    view = await readyz(session, admin_url)
            except (aiohttp.ClientError, OSError):
                continue  # a worker dying or starting
            views[health["pid"]] = {**view, "worker": health["worker"]}
        if want(views):
            return views
        await asyncio.sleep(0.1)
    raise AssertionError(f"worker views never as wanted: {views}")


async def proxied_labels(url: str, count: int = 40) -> list[tuple[int, str | None]]:
    async with fresh_connections() as session:
        async def one() -> tuple[int, str | None]:
            async with session.get(url) as response:
                await response.read()
                return response.status, response.headers.get("X-Backend")

        return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.slow
async def test_two_workers_reload_restart_and_stop(
    sidecar_process: StartProcess, backend: Backend, backend_b: Backend, redis_url: str,
) -> None:
    config = two_upstreams(backend, backend_b, redis_url, [DEFAULT_ROUTE],
                           server={"workers": 2, "watch_config": False})
    proc = sidecar_process(config)
    supervisor = proc.process.pid

    # Both workers serve, and the supervisor serves nothing itself.
    views = await worker_views(proc.admin_url, lambda v: len(v) == 2)
    pids = set(views)
    assert supervisor not in pids
    assert {parent_of(pid) for pid in pids} == {supervisor}
    assert sorted(v["worker"] for v in views.values()) == [0, 1]
    assert await proxied_labels(proc.url + "/api/products/7") == [(200, None)] * 40

    # SIGHUP to the supervisor reloads every worker.
    write_config(proc.config_path, {**config, "routes": [SEVEN_TO_B, DEFAULT_ROUTE]})
    proc.signal(signal.SIGHUP)
    views = await worker_views(proc.admin_url, lambda v: len(v) == 2 and all(
        view["reloads"]["ok"] == 1 for view in v.values()))
    assert set(views) == pids
    assert all(view["routes"] == 2 for view in views.values())
    assert await proxied_labels(proc.url + "/api/products/7") == [(200, "b")] * 40
    reloaded = {r["worker"] for r in log_records(proc) if r.get("msg") == "config reloaded"}
    assert reloaded == {0, 1}

    # SIGKILL one worker: the other keeps serving, the supervisor starts a replacement.
    victim = min(pids)
    victim_id = views[victim]["worker"]
    (survivor,) = pids - {victim}
    os.kill(victim, signal.SIGKILL)
    await wait_gone({victim}, 3)
    assert await proxied_labels(proc.url + "/api/products/7") == [(200, "b")] * 40
    views = await worker_views(proc.admin_url, lambda v: len(v) == 2 and victim not in v)
    (replacement,) = set(views) - {survivor}
    assert survivor in views
    assert parent_of(replacement) == supervisor
    assert views[replacement]["worker"] == victim_id
    # The replacement serves the config as reloaded, not the one the supervisor started with.
    assert views[replacement]["routes"] == 2
    assert await proxied_labels(proc.url + "/api/products/7") == [(200, "b")] * 40

    # SIGTERM to the supervisor stops everything.
    proc.signal(signal.SIGTERM)
    returncode, _ = await wait_exit(proc, 10)
    assert returncode == 0
    await wait_gone(pids | {replacement}, 2)
    assert await connection_refused(proc.port)
    assert await connection_refused(proc.admin_port)


# --- 5. redis lost and back --------------------------------------------------------------------


async def test_redis_loss_degrades_readiness_not_proxying(
    sidecar_factory: StartInProcess, backend: Backend, own_redis: RedisServer,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await sidecar_factory(make_config(backend.url, own_redis.url))
    assert (await readyz(client, sidecar.admin_url))["status"] == "ready"

    async def status_is(status: str, redis: str) -> bool:
        body = await readyz(client, sidecar.admin_url)
        return bool(body["status"] == status and body["redis"] == redis)

    traffic = Traffic(client, sidecar.url + "/api/products/1", loops=10)
    async with traffic:
        await asyncio.sleep(0.3)
        own_redis.kill()
        took = await wait_until(lambda: status_is("degraded", "down"), 2.5, "degraded")
        assert took < 2
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_redis.start)  # the same port
        await wait_until(lambda: status_is("ready", "up"), 3, "ready again")
        await asyncio.sleep(0.2)
    traffic.assert_clean()


# --- 6. embedded redis -------------------------------------------------------------------------


def embedded_config(backend: Backend, tmp_path: Path) -> dict[str, Any]:
    return make_config(backend.url, "embedded", server={"state_dir": str(tmp_path / "st")})


async def start_embedded(sidecar_process: StartProcess, backend: Backend, tmp_path: Path,
                         client: aiohttp.ClientSession) -> tuple[SidecarProcess, int]:
    proc = sidecar_process(embedded_config(backend, tmp_path))
    started = [r for r in log_records(proc) if r.get("msg") == "embedded redis started"]
    assert len(started) == 1, proc.logs()
    redis_pid = int(started[0]["pid"])
    assert alive(redis_pid)
    assert parent_of(redis_pid) == proc.process.pid
    assert "redis-server" in command_line(redis_pid)
    body = await readyz(client, proc.admin_url)
    assert (body["status"], body["redis"]) == ("ready", "up")
    async with client.get(proc.url + "/api/products/1") as response:
        assert response.status == 200
    return proc, redis_pid


async def test_embedded_redis_stops_with_sidecar(
    sidecar_process: StartProcess, backend: Backend, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    proc, redis_pid = await start_embedded(sidecar_process, backend, tmp_path, client)
    proc.signal(signal.SIGTERM)
    returncode, _ = await wait_exit(proc, 10)
    assert returncode == 0
    assert not alive(redis_pid), "redis-server outlived a clean stop"


async def test_embedded_redis_dies_with_killed_sidecar(
    sidecar_process: StartProcess, backend: Backend, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    proc, redis_pid = await start_embedded(sidecar_process, backend, tmp_path, client)
    proc.process.kill()
    returncode, _ = await wait_exit(proc, 5)
    assert returncode == -signal.SIGKILL
    await wait_gone({redis_pid}, 3)


async def test_sighup_while_workers_start_does_not_kill_them(
    sidecar_process: Callable[..., SidecarProcess], backend: Backend, redis_url: str,
) -> None:
    """A reload signal that reaches workers before they can handle it is ignored, not fatal."""
    config = make_config(backend.url, redis_url, server={"workers": 2})
    proc = sidecar_process(config, wait=False)
    await wait_until(_async(lambda: "worker started" in proc.logs()), 20, "workers spawned")
    for _ in range(30):
        await asyncio.sleep(0.03)
        proc.signal(signal.SIGHUP)
    await wait_until(lambda: _serves(proc.url), 20, "the sidecar serves")
    await asyncio.sleep(0.5)
    died = [r for r in log_records(proc) if r.get("msg") == "worker died; restarting it"]
    assert died == [], died
    assert proc.process.poll() is None


async def _serves(url: str) -> bool:
    try:
        async with fresh_connections() as session, session.get(url + "/api/products/1") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


# --- a start-up that fails halfway ---------------------------------------------------------


async def _redis_clients(redis_url: str) -> int:
    import redis.asyncio as aioredis

    probe = aioredis.Redis.from_url(redis_url)
    try:
        return len(await probe.client_list())  # type: ignore[no-untyped-call]
    finally:
        await probe.aclose()


async def test_a_start_that_fails_halfway_stops_what_it_started(
        backend: Backend, redis_url: str, tmp_path: Path) -> None:
    from sidecar.app import Runtime, StartupError
    from sidecar.config import load_config

    config = make_config(backend.url, redis_url, jobs={"workers": 1},
                         queues={"q": {"concurrency": 1}})
    public = int(config["server"]["listen"].rsplit(":", 1)[1])
    admin = int(config["server"]["admin_listen"].rsplit(":", 1)[1])
    before = await _redis_clients(redis_url)
    loaded = load_config(write_config(tmp_path / "config.yaml", config))
    runtime = Runtime(loaded, redis_url)
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", admin)  # the admin port
    try:
        with pytest.raises(StartupError) as failure:
            await runtime.start()
    finally:
        taken.close()
        await taken.wait_closed()
    reason = str(failure.value)
    assert "\n" not in reason
    assert f"127.0.0.1:{admin}" in reason and "server.admin_listen" in reason, reason
    # The public listener had started: it is closed again, and so is every Redis client.
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", public))

    async def redis_released() -> bool:
        return await _redis_clients(redis_url) <= before

    await wait_until(redis_released, 5, "the Redis clients closed")
    assert runtime.edge is None


def test_sidecar_run_with_its_admin_port_taken_exits_with_one_line(
        sidecar_process: StartProcess, backend: Backend, redis_url: str) -> None:
    config = make_config(backend.url, redis_url)
    admin = int(config["server"]["admin_listen"].rsplit(":", 1)[1])
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", admin))
        taken.listen()
        proc = sidecar_process(config, wait=False)
        assert proc.process.wait(20) == 1
    lines = [line for line in proc.logs().splitlines() if "cannot start" in line]
    assert len(lines) == 1, proc.logs()
    assert f"127.0.0.1:{admin}" in lines[0] and "server.admin_listen" in lines[0], lines[0]
    assert "Traceback" not in proc.logs()


async def test_a_worker_holds_three_redis_connections_besides_the_job_queues(
        sidecar_process: StartProcess, backend: Backend, redis_url: str) -> None:
    """The commands, one pub/sub connection for every service's channels, dedup's bulk
    transfers; the job queue's own two come on top. Each is named in CLIENT LIST."""
    proc = sidecar_process(make_config(backend.url, redis_url))
    client = aioredis.Redis.from_url(redis_url)
    pid = str(proc.process.pid)
    try:
        async def named() -> list[str]:
            return sorted(str(entry.get("name", "")).split(":")[1]
                          for entry in await client.client_list()
                          if str(entry.get("name", "")).endswith(":" + pid))

        async def all_up() -> bool:
            return {"commands", "pubsub", "jobs", "jobs-wake"} <= set(await named())
        await until(all_up)
        # bulk connects on its first transfer; commands is a pool, one per command at once
        # (one when idle, as here)
        roles = await named()
        assert set(roles) <= {"bulk", "commands", "jobs", "jobs-wake", "pubsub"}, roles
        assert len([role for role in roles if not role.startswith("jobs")]) <= 3, roles
    finally:
        await client.aclose()
