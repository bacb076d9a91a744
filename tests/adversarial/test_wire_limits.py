"""server.limits: how big and how slow a client request may be (docs/configuration.md).

Sizes are aiohttp's parser limits, answered as the sidecar's JSON errors (414, 431) and the body
limit (413) enforced before or while the body goes upstream; times are connection.EdgeProtocol's
deadlines for the head (slowloris) and between body bytes (408). Requests are written by hand
on sockets, as slowly as each test needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from support import InProcessSidecar, Origin, SidecarProcess, make_config, until

from sidecar.config import ConfigError, LimitsConfig, load_config

Factory = Callable[..., Awaitable[InProcessSidecar]]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["llhttp"])
def parser(request: pytest.FixtureRequest) -> str:
    """The edge parses with httptools (llhttp) only."""
    return str(request.param)


async def start(factory: Factory, origin: Origin, redis_url: str,
                **limits: Any) -> InProcessSidecar:
    return await factory(make_config(origin.url, redis_url, server={"limits": limits}))


class Conn:
    """A raw client connection: write bytes when told, collect what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = b""
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_until_closed(self, timeout: float = 15.0) -> bytes:
        """Everything until the sidecar closes the connection (AssertionError if it does not
        within `timeout`)."""
        try:
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    self.received += chunk
        except ConnectionError:
            pass
        except TimeoutError:
            raise AssertionError(f"still open after {timeout}s: {self.received!r}") from None
        self.closed = True
        self.writer.close()
        return self.received

    async def response(self, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
        """One response with a Content-Length body, leaving the connection open."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, headers = parse_head(head)
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def parse_head(data: bytes) -> tuple[int, dict[str, str]]:
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}


def error_of(data: bytes) -> tuple[int, str]:
    """(status, JSON error code) of a whole response."""
    status, _ = parse_head(data)
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert set(body) == {"error", "detail", "request_id"}, body
    return status, body["error"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def fd_baseline(pid: int) -> int:
    """The process's open files once the connections of a request just made have closed."""
    samples = []
    for _ in range(5):
        samples.append(fd_count(pid))
        await asyncio.sleep(0.1)
    return min(samples)


async def served(url: str, path: str = "/ok") -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        assert response.status == 200
        return await response.read()


# --- sizes: request line, headers --------------------------------------------------------------


async def send_in_pieces(conn: Conn, data: bytes, pieces: int) -> None:
    """`data` in `pieces` writes, the last 200 bytes in the last one. (Nothing may follow the
    write that crosses a limit: the sidecar closes at once, and bytes still arriving would make
    the kernel reset the connection, losing the answer.)"""
    if pieces > 1:
        head, data = data[:-200], data[-200:]
        step = -(-len(head) // (pieces - 1))
        for i in range(0, len(head), step):
            conn.write(head[i:i + step])
            await asyncio.sleep(0.005)
    conn.write(data)


@pytest.mark.parametrize("pieces", [1, 40], ids=["whole", "trickled"])
async def test_request_line_over_the_limit_gets_414(
        parser: str, pieces: int, sidecar_factory: Factory, origin: Origin, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    origin.reply("/ok")
    edge = await start(sidecar_factory, origin, redis_url, max_request_line=1024)
    assert (await served(edge.url, "/ok?" + "a" * 900)).startswith(b"/ok")
    conn = await Conn.open(edge.runtime.public_port or 0)
    await send_in_pieces(conn, b"GET /ok?" + b"a" * 1100 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                         pieces)
    assert error_of(await conn.read_until_closed()) == (414, "request_line_too_long")
    assert origin.calls["/ok"] == 1
    [record] = [r for r in caplog.records if r.name == "sidecar.connection"]
    assert record.levelname == "WARNING" and record.status == 414  # type: ignore[attr-defined]
    assert "max_request_line" in record.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("pieces", [1, 40], ids=["whole", "trickled"])
async def test_header_field_over_the_limit_gets_431(
        parser: str, pieces: int, sidecar_factory: Factory, origin: Origin,
        redis_url: str) -> None:
    origin.reply("/ok")
    # (max_request_line too: aiohttp's Python parser checks a header line that arrives in
    # pieces against max_line_size, not max_field_size.)
    edge = await start(sidecar_factory, origin, redis_url, max_header_size=2048,
                       max_request_line=2048)
    conn = await Conn.open(edge.runtime.public_port or 0)
    conn.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Fits: " + b"b" * 1500 + b"\r\n\r\n")
    assert (await conn.response())[0] == 200
    data = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2100 + b"\r\n\r\n"
    await send_in_pieces(conn, data, pieces)
    assert error_of(await conn.read_until_closed()) == (431, "request_headers_too_large")
    assert origin.calls["/ok"] == 1


async def test_too_many_headers_get_431(parser: str, sidecar_factory: Factory, origin: Origin,
                                        redis_url: str) -> None:
    origin.reply("/ok")
    edge = await start(sidecar_factory, origin, redis_url, max_headers=20)
    port = edge.runtime.public_port or 0
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(15))
    conn = await Conn.open(port)
    conn.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert (await conn.response())[0] == 200
    conn.close()
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    conn = await Conn.open(port)
    conn.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert error_of(await conn.read_until_closed()) == (431, "request_headers_too_large")
    assert origin.calls["/ok"] == 1


async def test_default_limits_refuse_what_nginx_refuses(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    """nginx answers 414 / 400 past its 8k buffers; the defaults are of that size."""
    origin.reply("/ok")
    edge = await start(sidecar_factory, origin, redis_url)
    port = edge.runtime.public_port or 0
    cases = {
        b"GET /ok?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": 414,
        b"GET /ok HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n": 431,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n": 431,
    }
    for data, status in cases.items():
        conn = await Conn.open(port)
        conn.write(data)
        assert error_of(await conn.read_until_closed())[0] == status
    assert origin.calls["/ok"] == 0


# --- max_body --------------------------------------------------------------------------------


def recording_body_reader(origin: Origin, path: str) -> dict[str, Any]:
    """Script `path` to read the whole body and note how that ended."""
    seen: dict[str, Any] = {"bytes": 0, "outcome": None}

    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        seen.update(outcome="reading", bytes=0)
        try:
            while chunk := await request.content.readany():
                seen["bytes"] += len(chunk)
        except Exception as exc:  # what a cut body looks like to the app
            seen["outcome"] = f"failed: {type(exc).__name__}"
            return web.Response(status=499)
        seen["outcome"] = "whole"
        return web.Response(text=f"got {seen['bytes']}")

    origin.script(path, handler)
    return seen


async def test_content_length_over_max_body_gets_413_before_anything_goes_upstream(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    seen = recording_body_reader(origin, "/up")
    edge = await start(sidecar_factory, origin, redis_url, max_body="1MiB")
    conn = await Conn.open(edge.runtime.public_port or 0)
    # Expect: 100-continue: the client waits for a go-ahead that must not come.
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: %d\r\n\r\n" % (1024**2 + 1))
    status, headers, body = await conn.response()
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"] == "request_body_too_large"
    assert origin.calls["/up"] == 0 and seen["outcome"] is None
    conn.close()
    async with aiohttp.ClientSession() as session, session.post(
            edge.url + "/up", data=b"x" * 1024**2) as response:
        assert response.status == 200
        assert await response.text() == f"got {1024**2}"


async def test_chunked_body_growing_past_max_body_is_cut_and_upstream_aborted(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    seen = recording_body_reader(origin, "/up")
    edge = await start(sidecar_factory, origin, redis_url, max_body="256KiB")
    conn = await Conn.open(edge.runtime.public_port or 0)
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"z" * 64 * 1024)
    for _ in range(3):  # 192 KiB: under the limit, streaming upstream already
        conn.write(chunk)
    await until(lambda: _async(seen["bytes"] > 0))
    for _ in range(2):
        conn.write(chunk)
    status, headers, body = await conn.response()
    assert (status, headers["connection"]) == (413, "close")
    assert json.loads(body)["error"] == "request_body_too_large"
    await until(lambda: _async(seen["outcome"] not in (None, "reading")))
    assert seen["outcome"].startswith("failed"), seen
    assert seen["bytes"] <= 256 * 1024
    conn.close()

    # A chunked body of exactly max_body passes.
    async def exact() -> Any:
        yield b"y" * (256 * 1024)

    async with aiohttp.ClientSession() as session, session.post(
            edge.url + "/up", data=exact()) as response:
        assert response.status == 200
        assert await response.text() == f"got {256 * 1024}"


# --- header_timeout: slowloris -------------------------------------------------------------------


async def trickle(port: int, data: bytes, every: float, first: int = 0) -> Conn:
    """Send `first` bytes of `data` at once, then the rest a byte every `every` seconds, until
    the sidecar closes the connection."""
    conn = await Conn.open(port)
    reading = asyncio.create_task(conn.read_until_closed(timeout=30))
    try:
        conn.write(data[:first])
        for byte in data[first:]:
            if reading.done():
                break
            conn.write(bytes([byte]))
            await asyncio.sleep(every or 0.5)
        await reading
    finally:
        reading.cancel()
        conn.close()
    return conn


@pytest.mark.slow
async def test_slowloris_connections_are_closed_with_408_and_fds_come_back(
        sidecar_process: Callable[..., SidecarProcess], origin: Origin, redis_url: str) -> None:
    origin.reply("/ok")
    proc = sidecar_process(make_config(origin.url, redis_url, server={
        "limits": {"header_timeout": "1s"}}))
    pid = proc.process.pid
    await served(proc.url)
    baseline = await fd_baseline(pid)
    head = b"GET /ok HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n"
    started = time.monotonic()
    slow = [asyncio.create_task(trickle(proc.port, head, every=1.0)) for _ in range(50)]

    async def all_open() -> bool:
        return fd_count(pid) >= baseline + 50

    await until(all_open)
    await served(proc.url)  # a normal client while they hang
    conns = await asyncio.wait_for(asyncio.gather(*slow), 30)
    assert time.monotonic() - started < 20
    assert all(c.closed for c in conns)
    answered = [error_of(c.received) for c in conns if c.received]
    assert answered and set(answered) == {(408, "request_timeout")}

    async def back_to_baseline() -> bool:
        return fd_count(pid) <= baseline

    await until(back_to_baseline)
    await served(proc.url)

    async def logged() -> bool:
        return len(answered) <= proc.logs().count("request head too slow") <= 50

    await until(logged)


async def test_a_connection_that_sends_nothing_is_closed_without_a_word(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    edge = await start(sidecar_factory, origin, redis_url, header_timeout="1s")
    conn = await Conn.open(edge.runtime.public_port or 0)
    assert await conn.read_until_closed() == b""


@pytest.mark.slow
async def test_idle_keepalive_outlives_header_timeout_but_a_slow_next_head_does_not(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/ok")
    edge = await start(sidecar_factory, origin, redis_url, header_timeout="1s")
    conn = await Conn.open(edge.runtime.public_port or 0)
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    conn.write(request)
    assert (await conn.response())[0] == 200
    await asyncio.sleep(2.5)  # idle keep-alive: keepalive_timeout's business, not this one's
    conn.write(request)
    assert (await conn.response())[0] == 200
    conn.write(request[:10])  # the next head starts, and stalls
    assert error_of(await conn.read_until_closed()) == (408, "request_timeout")
    assert origin.calls["/ok"] == 2


async def test_a_pipelined_head_trickling_behind_a_request_is_timed_out(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/ok")
    edge = await start(sidecar_factory, origin, redis_url, header_timeout="1s")
    port = edge.runtime.public_port or 0
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    conn = await trickle(port, request * 2, every=0.0, first=len(request) + 10)
    data = conn.received
    assert data.startswith(b"HTTP/1.1 200 ")
    assert error_of(data[data.index(b"HTTP/1.1 408"):]) == (408, "request_timeout")


# --- body_timeout -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_stalled_body_gets_408_the_upstream_request_is_aborted_and_fds_come_back(
        sidecar_process: Callable[..., SidecarProcess], origin: Origin, redis_url: str) -> None:
    seen = recording_body_reader(origin, "/up")
    proc = sidecar_process(make_config(origin.url, redis_url, server={
        "limits": {"body_timeout": "1s"}}))
    pid = proc.process.pid
    await served_from(origin, proc.url)
    baseline = await fd_baseline(pid)
    size = 512 * 1024  # streamed upstream (over the 64 KiB read whole)
    conn = await Conn.open(proc.port)
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    conn.write(b"h" * (size // 2))
    started = time.monotonic()
    data = await conn.read_until_closed()
    assert error_of(data) == (408, "request_timeout")
    assert 0.5 < time.monotonic() - started < 10
    await until(lambda: _async(seen["outcome"] not in (None, "reading")))
    assert seen["outcome"].startswith("failed") and seen["bytes"] <= size // 2, seen
    conn.close()

    async def back_to_baseline() -> bool:
        return fd_count(pid) <= baseline

    await until(back_to_baseline)
    assert "request refused; connection closed" in proc.logs()
    assert "Traceback" not in proc.logs()


async def test_a_small_stalled_body_never_reaches_the_upstream(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    edge = await start(sidecar_factory, origin, redis_url, body_timeout="1s")
    conn = await Conn.open(edge.runtime.public_port or 0)
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
    assert error_of(await conn.read_until_closed()) == (408, "request_timeout")
    assert origin.calls["/up"] == 0


async def test_a_client_leaving_mid_body_aborts_the_upstream_request_quietly(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    seen = recording_body_reader(origin, "/up")
    edge = await start(sidecar_factory, origin, redis_url)
    conn = await Conn.open(edge.runtime.public_port or 0)
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    conn.write(b"g" * 300_000)
    await until(lambda: _async(seen["bytes"] > 0))
    conn.close()
    await until(lambda: _async(seen["outcome"] not in (None, "reading")))
    assert seen["outcome"].startswith("failed"), seen
    await served_from(origin, edge.url)
    # A routine hang-up: no error log, no traceback (aiohttp logs both by default).
    assert not [r for r in caplog.records if r.levelno >= 40 or r.exc_info], caplog.text


@pytest.mark.slow
async def test_a_slow_but_steady_body_is_not_cut(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    recording_body_reader(origin, "/up")
    edge = await start(sidecar_factory, origin, redis_url, body_timeout="1500ms")
    conn = await Conn.open(edge.runtime.public_port or 0)
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(8):  # 3.2 s in all, never 1.5 s without a byte
        conn.write(b"%x\r\n%s\r\n" % (70_000, b"s" * 70_000))
        await asyncio.sleep(0.4)
    conn.write(b"0\r\n\r\n")
    status, _, body = await conn.response()
    conn.close()
    assert (status, body) == (200, b"got 560000")


@pytest.mark.slow
async def test_a_body_held_back_by_upstream_back_pressure_is_not_timed_out(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    """The upstream reads nothing for longer than body_timeout: the sidecar stops reading the
    client, who is then waiting on the sidecar, not the other way round."""
    size = 32 * 1024**2

    async def late_reader(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(3)
        got = 0
        while chunk := await request.content.readany():
            got += len(chunk)
        return web.Response(text=f"got {got}")

    origin.script("/up", late_reader)
    edge = await start(sidecar_factory, origin, redis_url, body_timeout="1s")
    conn = await Conn.open(edge.runtime.public_port or 0)
    conn.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    for _ in range(size // (1024**2)):
        conn.write(b"p" * 1024**2)
        await conn.writer.drain()
    status, _, body = await conn.response(timeout=30)
    conn.close()
    assert (status, body) == (200, f"got {size}".encode())


# --- configuration -------------------------------------------------------------------------------


def test_defaults_are_documented_and_sane() -> None:
    limits = LimitsConfig()
    assert (limits.max_request_line, limits.max_header_size, limits.max_headers) == (
        8190, 8190, 100)
    assert (limits.max_body, limits.header_timeout, limits.body_timeout) == (
        64 * 1024**2, 10.0, 30.0)
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for key in LimitsConfig.model_fields:
        assert re.search(rf"^\| `limits\.{key}` \| `[^`]+` \|", docs, re.MULTILINE), key


@pytest.mark.parametrize(("key", "value"), [
    ("max_body", "lots"), ("max_body", 0), ("header_timeout", "0s"), ("header_timeout", 10),
    ("body_timeout", "soon"), ("max_request_line", 16), ("max_header_size", "2GiB"),
    ("max_headers", 0), ("max_bodies", "1MiB"),
])
def test_bad_limits_are_refused_with_their_location(tmp_path: Path, key: str,
                                                    value: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_config(
        "http://127.0.0.1:8000", "redis://127.0.0.1:6379/0", server={"limits": {key: value}})))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [p.where for p in caught.value.problems] == [f"server.limits.{key}"]


async def served_from(origin: Origin, url: str) -> None:
    origin.reply("/ok")
    await served(url)


async def _async(value: bool) -> bool:
    return value
