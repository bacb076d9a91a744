"""Upstream failures become the right status and JSON body; stale keep-alive is retried."""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from support import Conn, InProcessSidecar, Script, ScriptedUpstream, free_port, make_config

StartSidecar = Callable[..., Awaitable[InProcessSidecar]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
StartScripted = Callable[[Script], Awaitable[ScriptedUpstream]]


async def _sidecar(sidecar_factory: StartSidecar, url: str, redis_url: str,
                   upstream: dict[str, Any] | None = None,
                   route: dict[str, Any] | None = None) -> InProcessSidecar:
    config = make_config(url, redis_url)
    config["upstreams"]["app"].update(upstream or {})
    config["routes"][0].update(route or {})
    return await sidecar_factory(config)


async def _error(client: aiohttp.ClientSession, url: str, status: int, code: str,
                 **kwargs: Any) -> dict[str, Any]:
    async with client.get(url, **kwargs) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        body: dict[str, Any] = await response.json()
        assert set(body) == {"error", "detail", "request_id"}
        assert body["error"] == code, body
        assert body["request_id"] == response.headers["X-Request-ID"]
        assert response.headers["Cache-Control"] == "no-store"
        return body


# --- no usable response ------------------------------------------------------------------------


async def test_connection_refused_is_502(
    sidecar_factory: StartSidecar, redis_url: str, client: aiohttp.ClientSession,
) -> None:
    port = free_port()  # nothing listens here
    sidecar = await _sidecar(sidecar_factory, f"http://127.0.0.1:{port}", redis_url)
    body = await _error(client, sidecar.url + "/x", 502, "upstream_connect_error")
    assert f"127.0.0.1:{port}" in body["detail"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    body = await _error(client, sidecar.url + "/x", 502, "upstream_connect_error",
                        headers={"X-Request-ID": "trace-77"})
    assert body["request_id"] == "trace-77"


async def _hang(conn: Conn) -> None:
    await conn.read_request()
    await asyncio.Event().wait()  # accept, read, never answer


@pytest.mark.parametrize("where", ["upstream", "route"])
async def test_no_answer_within_timeout_is_504(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession, where: str,
) -> None:
    upstream = await scripted(_hang)
    # make_config gives the upstream a 5s timeout; the 500ms must be the one that applies
    setting = {"timeout": "500ms"}
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url,
                             upstream=setting if where == "upstream" else None,
                             route=setting if where == "route" else None)
    started = time.monotonic()
    body = await _error(client, sidecar.url + "/slow", 504, "upstream_timeout")
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 4, elapsed
    assert "0.5s" in body["detail"]
    assert upstream.connections == 1


async def test_upstream_closes_without_a_byte_is_502(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    async def close_at_once(conn: Conn) -> None:
        await conn.read_request()

    upstream = await scripted(close_at_once)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    await _error(client, sidecar.url + "/x", 502, "upstream_connect_error")
    assert upstream.connections == 1  # a fresh connection is not retried


async def test_upstream_closes_mid_head_is_502(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    async def half_a_head(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    upstream = await scripted(half_a_head)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    body = await _error(client, sidecar.url + "/x", 502, "upstream_connect_error")
    assert "closed" in body["detail"]


@pytest.mark.parametrize("garbage", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 abc Nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS record, as from a TLS-only port
])
async def test_garbage_response_is_502(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession, garbage: bytes,
) -> None:
    async def send_garbage(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(garbage)
        await asyncio.Event().wait()

    upstream = await scripted(send_garbage)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    body = await _error(client, sidecar.url + "/x", 502, "upstream_protocol_error")
    assert "invalid HTTP response" in body["detail"]


# --- failures after the status line went out ---------------------------------------------------


@pytest.mark.parametrize("pause", [False, True])
async def test_small_response_cut_short_is_a_502(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession, pause: bool,
) -> None:
    """A small response (<= 256 KiB by Content-Length) is held until whole, so a cut one can
    still become a clean 502 instead of a broken 200."""

    async def cut_short(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        if pause:
            await asyncio.sleep(0.2)
            await conn.send(b"y" * 100)

    upstream = await scripted(cut_short)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    body = await _error(client, sidecar.url + "/x", 502, "upstream_protocol_error")
    assert "mid-response" in body["detail"]


@pytest.mark.parametrize("pause", [False, True])
async def test_upstream_closes_mid_body_truncates_the_response(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession, pause: bool,
) -> None:
    """Once the head of a streamed response is forwarded a 502 is impossible: the client must
    see a broken body, never a clean end of a short one."""

    async def cut_short(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100)
        if pause:
            await asyncio.sleep(0.2)
            await conn.send(b"y" * 100)

    upstream = await scripted(cut_short)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    async with client.get(sidecar.url + "/x") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_chunked_body_cut_short_truncates_the_response(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    async def cut_chunked(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.2)

    upstream = await scripted(cut_chunked)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    async with client.get(sidecar.url + "/x") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_small_body_stall_beyond_timeout_is_a_504(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    async def stall(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await asyncio.Event().wait()

    upstream = await scripted(stall)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url,
                             upstream={"timeout": "300ms"})
    started = time.monotonic()
    await _error(client, sidecar.url + "/x", 504, "upstream_timeout")
    assert time.monotonic() - started < 4


async def test_body_stall_beyond_timeout_truncates_the_response(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    async def stall(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nhello")
        await asyncio.Event().wait()

    upstream = await scripted(stall)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url,
                             upstream={"timeout": "300ms"})
    started = time.monotonic()
    async with client.get(sidecar.url + "/x") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert time.monotonic() - started < 4


# --- keep-alive connections closed by the upstream ---------------------------------------------


async def test_keepalive_closed_while_idle_is_replaced(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    closed = asyncio.Event()

    async def one_then_close(conn: Conn) -> None:
        request = await conn.read_request()
        assert request is not None
        upstream.requests.append(request)
        await conn.send(OK)  # keep-alive by HTTP/1.1 default, then close while idle
        await asyncio.sleep(0.05)
        conn.writer.close()
        closed.set()

    upstream = await scripted(one_then_close)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    for _ in range(3):
        closed.clear()
        async with client.get(sidecar.url + "/x") as response:
            assert response.status == 200
            assert await response.read() == b"ok"
        await asyncio.wait_for(closed.wait(), 5)
    assert len(upstream.requests) == 3
    assert upstream.connections == 3


async def test_keepalive_closed_as_the_request_arrives_is_retried(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    """The race every keep-alive client meets: the upstream closes an idle connection just as the
    next request is written to it. No byte came back, so the request is safe to send again."""

    async def serve_one_then_drop_the_next(conn: Conn) -> None:
        request = await conn.read_request()
        assert request is not None
        upstream.requests.append(request)
        await conn.send(OK)
        if await conn.read_request() is not None:
            upstream.dropped += 1  # read it, then close without a byte of answer

    upstream = await scripted(serve_one_then_drop_the_next)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    async with client.get(sidecar.url + "/first") as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    payload = b"small replayable body"
    async with client.post(sidecar.url + "/second", data=payload) as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    async with client.get(sidecar.url + "/third") as response:
        assert response.status == 200
    assert upstream.dropped == 2
    assert upstream.connections == 3
    assert [r.split(b" ")[1] for r in upstream.requests] == [b"/first", b"/second", b"/third"]
    assert upstream.requests[1].endswith(b"\r\n\r\n" + payload)


async def test_stale_keepalive_with_streamed_body_is_not_replayed(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    # DESIGN: a request body too large to hold (> 64 KiB, streamed) cannot be sent again, so a
    # stale keep-alive connection turns into a 502 for it rather than a retry. Documented here so
    # a change in that trade-off is deliberate.
    async def serve_one_then_drop_the_next(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(OK)
        await conn.read_request()

    upstream = await scripted(serve_one_then_drop_the_next)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    async with client.get(sidecar.url + "/warm") as response:
        assert response.status == 200
        await response.read()
    big = os.urandom(200 * 1024)
    async with client.post(sidecar.url + "/big", data=io.BytesIO(big),
                           headers={"Content-Length": str(len(big))}) as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_connect_error"
    assert upstream.connections == 1


async def test_upstream_connection_close_is_not_reused(
    sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    async def answer_and_close(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            upstream.requests.append(request)
            await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            # keep the socket open: the sidecar must not reuse it anyway

    upstream = await scripted(answer_and_close)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    for _ in range(3):
        async with client.get(sidecar.url + "/x") as response:
            assert response.status == 200
            assert await response.read() == b"ok"
    assert upstream.connections == 3
