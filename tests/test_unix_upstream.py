"""An upstream on a unix socket (`url: unix:///run/app.sock`), the usual link between a
sidecar and the app in its pod: a real aiohttp app listening on a socket file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import make_config


@pytest.fixture
async def socket_app(tmp_path: Path) -> AsyncIterator[tuple[str, asyncio.Event, list[Any]]]:
    """The app's socket path, the event its stream waits on between chunks, and the headers
    of each request it saw."""
    gate = asyncio.Event()
    seen: list[Any] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(request.headers.copy())
        return web.Response(text="over a socket", headers={"Cache-Control": "max-age=60"})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await gate.wait()              # the client has the first chunk before the second exists
        await response.write(b"second")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "app.sock"
    await web.UnixSite(runner, str(path)).start()
    yield str(path), gate, seen
    await runner.cleanup()


async def test_a_unix_socket_upstream_answers_keeps_alive_and_streams(
        sidecar_factory: Any, redis_url: str, client: aiohttp.ClientSession,
        socket_app: tuple[str, asyncio.Event, list[Any]]) -> None:
    path, gate, seen = socket_app
    sidecar = await sidecar_factory(make_config(f"unix://{path}", redis_url))
    for _ in range(3):
        async with client.get(sidecar.url + "/hello") as response:
            assert response.status == 200
            assert await response.text() == "over a socket"
    assert seen[0]["Host"].startswith("127.0.0.1:")  # the client's Host, as for any upstream
    stats = sidecar.runtime.state.pools["app"].stats()
    assert stats["open"] == 1  # one connection, kept alive for all three

    async with client.get(sidecar.url + "/stream") as response:
        assert response.status == 200
        first = await response.content.readuntil(b";")
        assert first == b"first;"
        gate.set()
        assert await response.read() == b"second"


async def test_a_missing_socket_is_a_502_naming_it(
        sidecar_factory: Any, redis_url: str, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    sidecar = await sidecar_factory(make_config(f"unix://{tmp_path}/nothing.sock", redis_url))
    async with client.get(sidecar.url + "/hello") as response:
        assert response.status == 502
        body = await response.json()
    assert f"{tmp_path}/nothing.sock" in body["detail"]
