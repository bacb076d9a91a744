"""WebSocket pass-through: the client's upgrade is replayed to the upstream, then frames are pumped
both ways until either side closes. aiohttp does the framing on both sides (pings, fragmentation,
close handshake), which is why WebSockets use a ClientSession while plain HTTP does not."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from .errors import UpstreamConnectError, UpstreamError, UpstreamTimeoutError

if TYPE_CHECKING:
    from .app import Runtime, State
    from .routing import Route

log = logging.getLogger("sidecar.websocket")

# Headers aiohttp writes itself for the upstream handshake, or that are hop-by-hop.
_NOT_FORWARDED = frozenset({
    "connection", "upgrade", "sec-websocket-key", "sec-websocket-version",
    "sec-websocket-extensions", "sec-websocket-protocol", "host", "content-length",
    "transfer-encoding", "keep-alive", "te", "trailer", "proxy-connection",
})


async def proxy_websocket(runtime: Runtime, state: State, route: Route,
                          request: web.BaseRequest, request_id: str) -> web.StreamResponse:
    upstream = state.upstream_configs[route.upstream]
    scheme = "wss" if upstream.scheme == "https" else "ws"
    url = f"{scheme}://{upstream.netloc}{request.raw_path}"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    if upstream.preserve_host and request.host:
        headers["Host"] = request.host
    client_ip = request.remote or ""
    xff = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{xff}, {client_ip}" if xff else client_ip
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Request-ID"] = request_id
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    try:
        upstream_ws = await runtime.ws_session.ws_connect(
            url, headers=headers, protocols=protocols, autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamError(route.upstream, f"upstream refused the WebSocket upgrade with "
                                            f"{exc.status}") from None
    except TimeoutError:
        raise UpstreamTimeoutError(route.upstream, "WebSocket handshake timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamConnectError(route.upstream, f"WebSocket connect failed: {exc}") from None

    client_ws = web.WebSocketResponse(
        protocols=[upstream_ws.protocol] if upstream_ws.protocol else (), autoping=True,
        max_msg_size=0,
    )
    client_ws.headers["X-Request-ID"] = request_id
    await client_ws.prepare(request)

    async def pump(source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
                   sink: aiohttp.ClientWebSocketResponse | web.WebSocketResponse) -> None:
        async for message in source:
            if message.type == WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == WSMsgType.ERROR:
                break
        if not sink.closed:
            await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)

    tasks = [asyncio.ensure_future(pump(client_ws, upstream_ws)),
             asyncio.ensure_future(pump(upstream_ws, client_ws))]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        async with asyncio.timeout(10):  # the other direction's close handshake
            for task in pending:
                await asyncio.shield(task)
    except (TimeoutError, ConnectionError) as exc:
        log.info("websocket closed uncleanly", extra={"request_id": request_id, "error": str(exc)})
    finally:
        for task in tasks:
            task.cancel()
        await upstream_ws.close()
        if not client_ws.closed:
            await client_ws.close()
    return client_ws
