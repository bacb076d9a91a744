"""The upstream pool on its own, against a real aiohttp upstream."""

from __future__ import annotations

import pytest
from aiohttp import web
from conftest import Origin

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
