"""WebSocket pass-through: echo of text and binary, subprotocol negotiation, close both ways."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from support import InProcessSidecar, free_port, make_config

StartSidecar = Callable[..., Awaitable[InProcessSidecar]]


async def test_echo_text_and_binary_with_subprotocol(
    sidecar: InProcessSidecar, client: aiohttp.ClientSession,
) -> None:
    async with client.ws_connect(sidecar.url + "/ws/echo", protocols=("echo",)) as ws:
        assert ws.protocol == "echo"
        await ws.send_str("hello ünïcode")
        assert await ws.receive_str(timeout=5) == "hello ünïcode"
        blob = os.urandom(300_000)  # several frames' worth
        await ws.send_bytes(blob)
        assert await ws.receive_bytes(timeout=5) == blob
        for i in range(20):
            await ws.send_str(f"m{i}")
        assert [await ws.receive_str(timeout=5) for _ in range(20)] == [f"m{i}" for i in range(20)]


async def test_handshake_response_carries_request_id(
    sidecar: InProcessSidecar, client: aiohttp.ClientSession,
) -> None:
    headers = {"X-Request-ID": "ws-abc-123"}
    async with client.ws_connect(sidecar.url + "/ws/echo", headers=headers) as ws:
        assert ws._response.headers["X-Request-ID"] == "ws-abc-123"  # no public accessor
        # no subprotocol asked for, none chosen
        assert ws.protocol is None
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "x"


async def test_unsupported_subprotocol_is_not_negotiated(
    sidecar: InProcessSidecar, client: aiohttp.ClientSession,
) -> None:
    async with client.ws_connect(sidecar.url + "/ws/echo", protocols=("chat.v9",)) as ws:
        assert ws.protocol is None


@dataclass
class WsUpstream:
    url: str
    closed_with: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    headers: asyncio.Queue[dict[str, str]] = field(default_factory=asyncio.Queue)


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """Echoes; closes with 4001 when sent "bye"; records how the client side closed."""
    upstream = WsUpstream("")

    async def handler(request: web.Request) -> web.WebSocketResponse:
        upstream.headers.put_nowait(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("echo",))
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT and message.data == "bye":
                await ws.close(code=4001, message=b"server says bye")
                break
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
        upstream.closed_with.put_nowait(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    upstream.url = f"http://127.0.0.1:{port}"
    yield upstream
    await runner.cleanup()


async def test_client_close_reaches_the_upstream(
    sidecar_factory: StartSidecar, ws_upstream: WsUpstream, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await sidecar_factory(make_config(ws_upstream.url, redis_url))
    ws = await client.ws_connect(sidecar.url + "/ws", protocols=("echo",))
    await ws.send_str("ping")
    assert await ws.receive_str(timeout=5) == "ping"
    await ws.close(code=4002)
    assert await asyncio.wait_for(ws_upstream.closed_with.get(), 5) == 4002


async def test_upstream_close_reaches_the_client(
    sidecar_factory: StartSidecar, ws_upstream: WsUpstream, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await sidecar_factory(make_config(ws_upstream.url, redis_url))
    async with client.ws_connect(sidecar.url + "/ws", protocols=("echo",)) as ws:
        await ws.send_str("bye")
        message = await ws.receive(timeout=5)
        assert message.type == WSMsgType.CLOSE
        assert message.data == 4001
        assert ws.close_code == 4001


async def test_upgrade_request_headers_forwarded(
    sidecar_factory: StartSidecar, ws_upstream: WsUpstream, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await sidecar_factory(make_config(ws_upstream.url, redis_url))
    headers = {"X-Request-ID": "ws-fwd-1", "Authorization": "Bearer t0k",
               "X-Forwarded-For": "203.0.113.9"}
    async with client.ws_connect(sidecar.url + "/ws", headers=headers):
        seen = await asyncio.wait_for(ws_upstream.headers.get(), 5)
    assert seen["X-Request-ID"] == "ws-fwd-1"
    assert seen["Authorization"] == "Bearer t0k"
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["Host"] == sidecar.url.removeprefix("http://")


async def test_upstream_without_websocket_is_a_502(
    sidecar_factory: StartSidecar, redis_url: str, client: aiohttp.ClientSession,
) -> None:
    sidecar = await sidecar_factory(make_config(f"http://127.0.0.1:{free_port()}", redis_url))
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(sidecar.url + "/ws")
    assert caught.value.status == 502
