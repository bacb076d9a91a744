"""The edge on the wire: pipelined requests answered in order, `Expect: 100-continue`, and an
upgraded connection that carries bytes which are not WebSocket frames, through a real sidecar,
with raw sockets on the client side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from support import (
    InProcessSidecar,
    Origin,
    free_port,
    make_config,
    read_responses,
    until,
    write_config,
)

Factory = Callable[..., Awaitable[InProcessSidecar]]


# --- pipelining --------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    """Three requests in one write; the first is the slowest at the upstream. The answers come
    back in the order asked, each with its own body, on the one connection."""
    release = asyncio.Event()

    async def slow(request: web.Request, n: int) -> web.Response:
        await release.wait()
        return web.Response(text="first")

    origin.script("/first", slow)
    origin.reply("/second", body="second")
    origin.reply("/third", body="third")
    sidecar = await sidecar_factory(make_config(origin.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /third HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        await asyncio.sleep(0.2)  # let the later two be parsed while the first waits
        assert origin.calls["/second"] == 0  # answered one at a time: not started yet
        release.set()
        parsed = await read_responses(reader, 3)
    finally:
        writer.close()
    assert parsed.statuses == [200, 200, 200]
    assert parsed.bodies == [b"first", b"second", b"third"]
    assert len({h["x-request-id"] for h in parsed.headers}) == 3


async def test_many_pipelined_requests_in_one_write(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    """More requests than the queue holds before reading pauses: all answered, in order."""
    origin.reply("/n", body="n")
    sidecar = await sidecar_factory(make_config(origin.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        writer.write(b"".join(b"GET /n?i=%d HTTP/1.1\r\nHost: x\r\nX-Request-ID: r%d\r\n\r\n"
                              % (i, i) for i in range(100)))
        parsed = await read_responses(reader, 100)
    finally:
        writer.close()
    assert parsed.statuses == [200] * 100
    assert [h["x-request-id"] for h in parsed.headers] == [f"r{i}" for i in range(100)]


# --- Expect: 100-continue ----------------------------------------------------------------------


async def test_expect_100_continue_is_answered_before_the_body(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    async def echo(request: web.Request, n: int) -> web.Response:
        return web.Response(body=await request.read())

    origin.script("/upload", echo)
    sidecar = await sidecar_factory(make_config(origin.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        parsed = await read_responses(reader, 1)
    finally:
        writer.close()
    assert (parsed.statuses, parsed.bodies) == ([200], [b"hello"])
    assert "expect" not in {k.lower() for k in origin.seen["/upload"]}


async def test_expect_100_continue_over_max_body_is_refused_without_continue(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/upload")
    sidecar = await sidecar_factory(make_config(origin.url, redis_url,
                                                server={"limits": {"max_body": "1KiB"}}))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        parsed = await read_responses(reader, 1)
    finally:
        writer.close()
    assert parsed.statuses == [413]
    assert origin.calls["/upload"] == 0


# --- upgrades that are not WebSocket -----------------------------------------------------------


class EchoUpgradeUpstream:
    """Answers `Upgrade: x-shout` with 101, then sends back every byte upper-cased; records
    whether the client's end of stream reached it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.heads: list[bytes] = []
        self.got_eof = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if b"upgrade: x-shout" not in head.lower():
            writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-shout\r\n"
                     b"Connection: upgrade\r\n\r\n")
        while chunk := await reader.read(65536):
            writer.write(chunk.upper())
            await writer.drain()
        self.got_eof.set()
        writer.close()


def upgrade_request(protocol: bytes) -> bytes:
    return (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: " + protocol
            + b"\r\nConnection: Upgrade\r\n\r\n")


@pytest.fixture
async def shout() -> AsyncIterator[EchoUpgradeUpstream]:
    upstream = EchoUpgradeUpstream()
    await upstream.start()
    yield upstream
    assert upstream.server is not None
    upstream.server.close()


async def test_an_upgraded_connection_carries_any_bytes(
        sidecar_factory: Factory, shout: EchoUpgradeUpstream, redis_url: str) -> None:
    sidecar = await sidecar_factory(make_config(f"http://127.0.0.1:{shout.port}", redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        # The first bytes of the new protocol come in the same write as the request.
        writer.write(upgrade_request(b"x-shout") + b"hello ")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        lower = head.lower()
        assert b"upgrade: x-shout" in lower and b"connection: upgrade" in lower
        assert b"x-request-id: " in lower
        # Bytes that would be HTTP, or nothing parseable at all, pass untouched.
        payload = b"get / http/1.1\r\n\r\n\x00\xff\x10 binary" * 1000
        writer.write(payload)
        expected = (b"hello " + payload).upper()
        got = await asyncio.wait_for(reader.readexactly(len(expected)), 5)
        assert got == expected
        writer.write_eof()  # a half-close reaches the upstream, which then ends its side
        await asyncio.wait_for(shout.got_eof.wait(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    [upstream_head] = shout.heads
    assert b"upgrade: x-shout" in upstream_head.lower()
    assert b"connection: upgrade" in upstream_head.lower()
    # the tunnel is gone once both ends closed
    edge = sidecar.runtime.edge
    assert edge is not None

    async def no_connections() -> bool:
        return not edge.connections

    await until(no_connections, 5)


async def test_an_upgrade_refused_by_the_upstream_is_a_plain_response(
        sidecar_factory: Factory, shout: EchoUpgradeUpstream, redis_url: str) -> None:
    sidecar = await sidecar_factory(make_config(f"http://127.0.0.1:{shout.port}", redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        # Refused, then the connection goes on as HTTP: a second request on it is answered.
        writer.write(upgrade_request(b"x-other"))
        parsed = await read_responses(reader, 1)
        writer.write(upgrade_request(b"x-other"))
        again = await read_responses(reader, 1)
    finally:
        writer.close()
    assert (parsed.statuses, parsed.bodies) == ([426], [b"nope"])
    assert again.statuses == [426] and len(shout.heads) == 2


async def test_upgrade_passes_the_rate_limit(
        sidecar_factory: Factory, shout: EchoUpgradeUpstream, redis_url: str) -> None:
    """An upgrade goes through the route's rate limit like any request."""
    config = make_config(f"http://127.0.0.1:{shout.port}", redis_url)
    config["routes"][0]["rate_limit"] = {"rate": "1/m", "burst": 1, "scope": "local"}
    sidecar = await sidecar_factory(config)
    statuses = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
        writer.write(upgrade_request(b"x-shout"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        statuses.append(int(head.split()[1]))
        writer.close()
    assert statuses == [101, 429]


async def test_admin_stats_count_open_connections(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/a")
    sidecar = await sidecar_factory(make_config(origin.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_responses(reader, 1)  # a kept-alive connection, open and idle
        async with aiohttp.ClientSession() as session, session.get(
                sidecar.admin_url + "/admin/stats") as response:
            stats = await response.json()
    finally:
        writer.close()
    assert stats["requests"]["connections"] == 1


async def test_a_reload_applies_max_body(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    """The one limit a reload applies (docs/configuration.md): the next request sees it."""
    async def echo(request: web.Request, n: int) -> web.Response:
        return web.Response(body=await request.read())

    origin.script("/upload", echo)
    config = make_config(origin.url, redis_url, server={"limits": {"max_body": "1KiB"}})
    sidecar = await sidecar_factory(config)
    body = b"x" * 2000

    async def post() -> int:
        async with aiohttp.ClientSession() as session, session.post(
                sidecar.url + "/upload", data=body) as response:
            return response.status

    assert await post() == 413
    config["server"]["limits"]["max_body"] = "4KiB"
    write_config(sidecar.config_path, config)
    assert await sidecar.runtime.reload("test")
    assert await post() == 200
