"""Real parts for every test: a redis-server process, the example backend on a free port, and the
sidecar itself, in-process (fast) or as a subprocess (for signals, workers and memory)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import (
    Backend,
    InProcessSidecar,
    Origin,
    RedisServer,
    Script,
    ScriptedUpstream,
    SidecarProcess,
    free_port,
    make_config,
    wait_for_port,
    write_config,
)

from sidecar import native
from sidecar.app import Runtime
from sidecar.config import load_config
from sidecar.examples.backend import build_app


def pytest_configure(config: pytest.Config) -> None:
    # A compiled module older than its source would run the old code under the new tests.
    stale = native.stale()
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; "
                    "rebuild them with `make setup` (or `make pure` then "
                    "`SIDECAR_PURE=1 make setup` for none)",
                    returncode=4)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to kill."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """The example backend, in this test's event loop, on a free port."""
    app = build_app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield Backend(f"http://127.0.0.1:{port}", port, app)
    await runner.cleanup()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    """A scriptable upstream on a free port."""
    upstream = Origin()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream._handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    upstream.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    upstream.url = f"http://127.0.0.1:{upstream.port}"
    yield upstream
    await runner.cleanup()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedUpstream]]]:
    """Raw TCP upstreams whose every connection runs a script (support.ScriptedUpstream)."""
    servers: list[ScriptedUpstream] = []

    async def start(script: Script) -> ScriptedUpstream:
        upstream = ScriptedUpstream(script)
        upstream.server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
        upstream.port = upstream.server.sockets[0].getsockname()[1]
        servers.append(upstream)
        return upstream

    yield start
    for upstream in servers:
        await upstream.close()


@pytest.fixture
async def sidecar_factory(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[InProcessSidecar]]]:
    """Start a sidecar Runtime in this test's loop from a config dict (see make_config)."""
    started: list[Runtime] = []

    async def start(config: dict[str, Any], name: str = "config.yaml") -> InProcessSidecar:
        path = write_config(tmp_path / name, config)
        loaded = load_config(path)
        runtime = Runtime(loaded, loaded.config.redis.url)
        await runtime.start()
        started.append(runtime)
        return InProcessSidecar(runtime, path)

    yield start
    for runtime in started:
        await runtime.stop()


@pytest.fixture
async def sidecar(
    sidecar_factory: Callable[..., Awaitable[InProcessSidecar]], backend: Backend, redis_url: str
) -> InProcessSidecar:
    """The common case: one in-process sidecar in front of the example backend."""
    return await sidecar_factory(make_config(backend.url, redis_url))


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    procs: list[SidecarProcess] = []

    def start(config: dict[str, Any], name: str = "config.yaml",
              wait: bool = True) -> SidecarProcess:
        path = write_config(tmp_path / name, config)
        log_path = tmp_path / (name + ".log")
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(path)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        log_file.close()
        proc = SidecarProcess(path, config, process, log_path)
        procs.append(proc)
        if wait:
            try:
                wait_for_port(proc.admin_port, timeout=20)
                wait_for_port(proc.port, timeout=5)
            except TimeoutError:
                proc.stop()
                raise AssertionError(f"sidecar did not start:\n{proc.logs()}") from None
        return proc

    yield start
    for proc in procs:
        if not proc.stopped:
            proc.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


