"""Real parts for every test: a redis-server process, the example backend on a free port, and the
sidecar itself, in-process (fast) or as a subprocess (for signals, workers and memory)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar.app import Runtime
from sidecar.config import load_config
from sidecar.examples.backend import CALLS, build_app

ROOT = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in a session: the kernel may hand a port
    back as soon as it is released, and a config asking for two (public and admin) got one."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class RedisServer:
    """A real redis-server on a free port; kill() and start() for fault tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # More redis-server options, after the defaults (a later option wins), e.g.
        # ["--appendonly", "yes", "--appendfsync", "always"] for data that survives restart().
        self.options: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run the tests with `make test`, which "
                        "installs it")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel queues them) and takes
        commands, but nothing answers until resume()."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """SIGKILL, then a new redis-server on the same port (empty unless `options` turned
        persistence on)."""
        if self.process is not None:
            self.resume()  # a stopped process dies of SIGKILL too, but let it be plain
        self.kill()
        self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(64)


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


@dataclass
class Backend:
    url: str
    port: int
    app: web.Application

    def calls(self, key: str) -> int:
        return int(self.app[CALLS][key])


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


class Origin:
    """An upstream whose answers each test scripts per path, counting calls and keeping the
    headers of the last request it saw on each path."""

    def __init__(self) -> None:
        self.scripts: dict[str, Callable[[web.Request, int], Awaitable[web.StreamResponse]]] = {}
        self.calls: Counter[str] = Counter()
        self.seen: dict[str, Any] = {}
        self.url = ""
        self.port = 0

    def reply(self, path: str, *, status: int = 200, headers: dict[str, str] | None = None,
              body: str | None = None) -> None:
        """A fixed answer; the body defaults to `<path> #<call number>` so tests can tell
        a fresh response from a stored one."""
        fixed = dict(headers or {})

        async def answer(request: web.Request, n: int) -> web.Response:
            text = body if body is not None else f"{path} #{n}"
            return web.Response(status=status, headers=fixed, text=text)

        self.scripts[path] = answer

    def script(self, path: str,
               handler: Callable[[web.Request, int], Awaitable[web.StreamResponse]]) -> None:
        self.scripts[path] = handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls[request.path] += 1
        self.seen[request.path] = request.headers.copy()
        script = self.scripts.get(request.path)
        if script is None:
            return web.Response(status=404, text="not scripted")
        return await script(request, self.calls[request.path])


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


def make_config(upstream_url: str, redis_url: str, **sections: Any) -> dict[str, Any]:
    """A config dict listening on free ports, in front of `upstream_url`; `sections` override."""
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "admin_listen":
                   f"127.0.0.1:{free_port()}", "shutdown_grace": "5s",
                   "watch_interval": "100ms"},
        "redis": {"url": redis_url, "health_interval": "200ms"},
        "upstreams": {"app": {"url": upstream_url, "timeout": "5s", "connect_timeout": "1s"}},
        "log": {"access": False},
        "routes": [{"name": "default", "match": {"path": "/**"}, "upstream": "app"}],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class InProcessSidecar:
    runtime: Runtime
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.admin_port}"


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


@dataclass
class SidecarProcess:
    """`python -m sidecar run` as a real process."""

    config_path: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = field(default=False)

    @property
    def port(self) -> int:
        return int(self.config["server"]["listen"].rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        return int(self.config["server"]["admin_listen"].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stopped = True
        return self.process.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


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


async def gather_limited(coros: list[Awaitable[Any]], limit: int = 50) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[Any]) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `check` every 20 ms until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
