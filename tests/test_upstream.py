"""The upstream pool on its own, against a real aiohttp upstream or a raw one (exact bytes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from support import Conn, Origin, Script, ScriptedUpstream, until

from sidecar.config import UpstreamConfig
from sidecar.upstream import UpstreamPool


@pytest.mark.parametrize("body", [b"", b"x" * 200_000], ids=["empty", "200KiB"])
async def test_a_whole_body_under_a_chunked_head_is_framed_as_chunks(origin: Origin,
                                                                     body: bytes) -> None:
    async def echo(request: web.Request, n: int) -> web.Response:
        data = await request.read()
        return web.Response(text=f"{len(data)} {request.headers.get('Transfer-Encoding')}")

    origin.script("/echo", echo)
    pool = UpstreamPool("app", UpstreamConfig(url=origin.url))
    head = (b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        response = await pool.request(head, body, chunked=True, timeout=5.0)
        got = response.body if response.complete else b"".join(
            [chunk async for chunk in _chunks(response)])
        assert got == f"{len(body)} chunked".encode()
        again = await pool.request(head, body, chunked=True, timeout=5.0)  # framing kept
        assert again.status == 200
    finally:
        await pool.close()


async def _chunks(response):  # type: ignore[no-untyped-def]
    while chunk := await response.read():
        yield chunk


async def test_a_request_cancelled_before_the_response_drops_its_connection(
        origin: Origin) -> None:
    """The upstream sees the connection close (its work is abandoned), and the pool never
    hands that connection to the next request."""
    started = asyncio.Event()
    closed = asyncio.Event()

    async def slow(request: web.Request, n: int) -> web.Response:
        started.set()
        for _ in range(200):
            transport = request.transport
            if transport is None or transport.is_closing():
                closed.set()
                break
            await asyncio.sleep(0.02)
        return web.Response(text="late")

    origin.script("/slow", slow)
    origin.reply("/next", body="next")
    pool = UpstreamPool("app", UpstreamConfig(url=origin.url))
    try:
        task = asyncio.create_task(
            pool.request(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n", timeout=5.0))
        async with asyncio.timeout(5):
            await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(3):
            await closed.wait()
        response = await pool.request(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n", timeout=5.0)
        assert (response.status, response.body) == (200, b"next")
    finally:
        await pool.close()


async def test_a_connection_reused_after_a_body_that_paused_reading_reads_again(
        origin: Origin) -> None:
    """A streamed body whose last read both crosses the high-water mark (reading paused for a
    slow client) and completes it goes back to the pool: the next request on that connection
    must be read. It used to stay paused, so the next request waited for its timeout: a 504
    for a healthy upstream (found by loadtests/soak.py)."""
    first, last = 262_000, 1_000  # together just over the 256 KiB high-water mark

    async def big(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(first + last)})
        await response.prepare(request)
        await response.write(b"a" * first)
        await asyncio.sleep(0.2)  # read by the pool on its own, below the mark
        await response.write(b"b" * last)  # one segment: crosses the mark and ends the body
        return response

    origin.script("/big", big)
    origin.reply("/next", body="next")
    pool = UpstreamPool("app", UpstreamConfig(url=origin.url))
    try:
        response = await pool.request(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n", timeout=5.0)
        async def body_in() -> bool:  # the client reads nothing until the body is in
            return response.complete

        await until(body_in, timeout=5)
        body = b"".join([chunk async for chunk in _chunks(response)])
        assert body == b"a" * first + b"b" * last
        again = await pool.request(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n", timeout=1.0)
        assert (again.status, again.body) == (200, b"next")
        assert pool.stats()["open"] == 1  # that same connection answered
    finally:
        await pool.close()


async def test_interim_responses_go_to_the_request_not_into_the_answer(
        scripted: Callable[[Script], Awaitable[ScriptedUpstream]]) -> None:
    """1xx responses reach `interim` in order, as they come; the answer is the final response
    alone, with its own fields; the connection then serves the next request."""
    async def serve(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 102 Processing\r\n\r\n"
                            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    class Heard:
        def __init__(self) -> None:
            self.interims: list[tuple[int, str, list[tuple[bytes, bytes]]]] = []

        def interim(self, status: int, reason: str, headers: list[tuple[bytes, bytes]]) -> None:
            self.interims.append((status, reason, list(headers)))

    upstream = await scripted(serve)
    pool = UpstreamPool("app", UpstreamConfig(url=upstream.url))
    heard = Heard()
    try:
        response = await pool.request(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", timeout=5.0,
                                      interim=heard)
        assert (response.status, response.body) == (200, b"ok")
        assert response.headers == [(b"Content-Length", b"2")]
        assert heard.interims == [(102, "Processing", []),
                                  (103, "Early Hints", [(b"Link", b"</a.css>; rel=preload")])]
        again = await pool.request(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", timeout=5.0)
        assert (again.status, again.body) == (200, b"ok")
        assert upstream.connections == 1 and len(heard.interims) == 2
    finally:
        await pool.close()
