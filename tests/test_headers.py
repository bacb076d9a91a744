"""The proxy's header rules both ways, request ids, and bodies passed through untouched."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from support import Backend, InProcessSidecar, make_config

StartSidecar = Callable[..., Awaitable[InProcessSidecar]]

HEX32 = re.compile(r"^[0-9a-f]{32}$")


# --- raw HTTP on both sides, to see exact bytes ----------------------------------------------


@dataclass
class Message:
    """One parsed HTTP/1.1 message head (request or response) and its decoded body."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1])

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def _parse_head(head: bytes) -> Message:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    return Message(lines[0], headers)


async def _read_body(reader: asyncio.StreamReader, message: Message) -> bytes:
    length = message.get("Content-Length")
    if length is not None:
        return await reader.readexactly(int(length))
    encoding = message.get("Transfer-Encoding")
    if encoding is not None and encoding.lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers in these tests
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return b""


async def read_message(reader: asyncio.StreamReader, *, no_body: bool = False,
                       until_eof: bool = False) -> Message:
    message = _parse_head(await reader.readuntil(b"\r\n\r\n"))
    if no_body:
        return message
    if until_eof and message.get("Content-Length") is None and (
            message.get("Transfer-Encoding") is None):
        message.body = await reader.read()
    else:
        message.body = await _read_body(reader, message)
    return message


Handler = Callable[[Message, asyncio.StreamWriter], Awaitable[None]]


def answer(data: bytes) -> Handler:
    async def handle(request: Message, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return handle


@dataclass
class RawUpstream:
    """A real TCP server speaking hand-written HTTP/1.1: records requests, answers via handler."""

    handler: Handler
    requests: list[Message] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def last(self) -> Message:
        return self.requests[-1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(request)
                await self.handler(request, writer)
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(handler: Handler | None = None) -> RawUpstream:
        upstream = RawUpstream(handler or answer(OK))
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


StartRaw = Callable[..., Awaitable[RawUpstream]]


async def raw_exchange(url: str, requests: list[bytes], *,
                       no_body: tuple[bool, ...] = ()) -> list[Message]:
    """Send requests one after the other on one client connection; return the responses."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        responses = []
        for i, request in enumerate(requests):
            writer.write(request)
            await writer.drain()
            skip = no_body[i] if i < len(no_body) else False
            responses.append(await asyncio.wait_for(read_message(reader, no_body=skip), 10))
        return responses
    finally:
        writer.close()


async def one(url: str, request: bytes, **kwargs: Any) -> Message:
    return (await raw_exchange(url, [request], **kwargs))[0]


async def _sidecar(sidecar_factory: StartSidecar, upstream_url: str, redis_url: str,
                   **sections: Any) -> InProcessSidecar:
    return await sidecar_factory(make_config(upstream_url, redis_url, **sections))


# --- hop-by-hop ------------------------------------------------------------------------------

HOP_REQUEST = (
    b"GET /hop HTTP/1.1\r\n"
    b"Host: example.test\r\n"
    b"Connection: keep-alive, X-Foo\r\n"
    b"Connection: x-bar\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
    b"X-Foo: named-in-connection\r\n"
    b"X-Bar: named-in-second-connection\r\n"
    b"X-Keep: end-to-end\r\n"
    b"\r\n"
)
HOP_NAMES = {"connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection"}


async def test_hop_by_hop_request_headers_are_not_forwarded(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, HOP_REQUEST)
    assert response.status == 200
    sent = upstream.last.names()
    assert not sent & HOP_NAMES, sent & HOP_NAMES
    assert "proxy-authorization" not in sent
    assert "x-foo" not in sent
    assert "x-bar" not in sent  # named in a second Connection header
    assert upstream.last.get("X-Keep") == "end-to-end"


async def test_hop_by_hop_response_headers_are_not_returned(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Length: 2\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"Connection: X-Other\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"X-Secret: for-the-proxy-only\r\n"
        b"X-Other: also-hop\r\n"
        b"X-Keep: end-to-end\r\n"
        b"\r\nok"
    ))
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert response.body == b"ok"
    names = response.names()
    assert not names & HOP_NAMES, names  # keep-alive HTTP/1.1: no Connection of its own
    assert "x-secret" not in names
    assert "x-other" not in names
    assert response.get("X-Keep") == "end-to-end"


# --- Host, X-Forwarded-*, Via ------------------------------------------------------------------


async def test_host_is_preserved_by_default(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: shop.example.test:8443\r\n\r\n")
    assert upstream.last.get("Host") == "shop.example.test:8443"
    assert upstream.last.get("X-Forwarded-Host") == "shop.example.test:8443"


async def test_host_is_the_upstreams_without_preserve_host(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    config = make_config(upstream.url, redis_url)
    config["upstreams"]["app"]["preserve_host"] = False
    sidecar = await sidecar_factory(config)
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n")
    assert upstream.last.get("Host") == f"127.0.0.1:{upstream.port}"
    assert upstream.last.get("X-Forwarded-Host") == "shop.example.test"


async def test_x_forwarded_for_is_appended(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert upstream.last.get("X-Forwarded-For") == "127.0.0.1"
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")
    assert upstream.last.get("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n"
                           b"X-Forwarded-For: 198.51.100.1, 10.0.0.1\r\n\r\n")
    assert upstream.last.get("X-Forwarded-For") == (
        "203.0.113.7, 198.51.100.1, 10.0.0.1, 127.0.0.1")


SPOOFED = (b"GET / HTTP/1.1\r\nHost: real.test\r\nX-Forwarded-Proto: https\r\n"
           b"X-Forwarded-Host: spoofed.test\r\n\r\n")


async def test_x_forwarded_proto_and_host_are_set_not_trusted(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    await one(sidecar.url, SPOOFED)
    assert upstream.last.get("X-Forwarded-Proto") == "http"
    assert upstream.last.get("X-Forwarded-Host") == "real.test"


async def test_x_forwarded_proto_and_host_kept_with_trust_forwarded(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    config = make_config(upstream.url, redis_url)
    config["server"]["trust_forwarded"] = True
    sidecar = await sidecar_factory(config)
    await one(sidecar.url, SPOOFED)
    assert upstream.last.get("X-Forwarded-Proto") == "https"
    assert upstream.last.get("X-Forwarded-Host") == "spoofed.test"


async def test_via_on_the_request(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert upstream.last.get("Via") == "1.1 sidecar"
    await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.0 edge, 1.1 cdn\r\n\r\n")
    assert upstream.last.get("Via") == "1.0 edge, 1.1 cdn, 1.1 sidecar"
    await one(sidecar.url, b"GET / HTTP/1.0\r\nHost: h\r\n\r\n")
    assert upstream.last.get("Via") == "1.0 sidecar"
    # whatever the client spoke, the upstream hop is HTTP/1.1
    assert upstream.last.start == "GET / HTTP/1.1"


async def test_via_uses_server_via_name(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    config = make_config(upstream.url, redis_url)
    config["server"]["via"] = "edge-7"
    sidecar = await sidecar_factory(config)
    response = await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert upstream.last.get("Via") == "1.1 edge-7"
    assert response.get("Via") == "1.1 edge-7"


async def test_via_on_the_response_is_appended(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 origin-cache\r\n\r\nok"))
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.get("Via") == "1.1 origin-cache, 1.1 sidecar"


# --- X-Request-ID ------------------------------------------------------------------------------


async def test_valid_request_id_is_passed_through(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-ID: upstreams-own\r\n\r\nok"))
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    rid = "req-2024.06:abc/DEF+1=@x"
    response = await one(sidecar.url,
                         f"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: {rid}\r\n\r\n".encode())
    assert upstream.last.get("X-Request-ID") == rid
    assert response.get("X-Request-ID") == rid


@pytest.mark.parametrize("given", [None, "has space", "x" * 129, "semi;colon", "quote\"d"])
async def test_request_id_generated_when_absent_or_invalid(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str, given: str | None,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    extra = f"X-Request-ID: {given}\r\n" if given is not None else ""
    request = f"GET / HTTP/1.1\r\nHost: h\r\n{extra}\r\n".encode()
    first, second = await raw_exchange(sidecar.url, [request, request])
    rid = first.get("X-Request-ID")
    assert rid is not None and HEX32.match(rid), rid
    assert upstream.requests[0].get("X-Request-ID") == rid
    assert second.get("X-Request-ID") != rid


# --- bodies and headers the proxy must not invent ----------------------------------------------


async def test_no_content_type_or_server_added(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert response.body == b"hello"
    assert "content-type" not in response.names()
    assert "server" not in response.names()


async def test_no_content_type_or_server_added_when_streaming(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    async def slow_chunks(request: Message, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the head is forwarded before the body is complete
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    upstream = await raw_upstream(slow_chunks)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert response.body == b"hello world"
    assert "content-type" not in response.names()
    assert "server" not in response.names()


async def test_upstream_content_type_and_server_kept_exactly(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/x-odd; charset=latin-1\r\n"
        b"Server: origin/1.0\r\n\r\nok"))
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.all("Content-Type") == ["text/x-odd; charset=latin-1"]
    assert response.all("Server") == ["origin/1.0"]


async def test_gzip_response_passes_byte_for_byte(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    payload = gzip.compress(b'{"hello": "world"}' * 500, mtime=0)
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(payload), payload)))
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    async with client.get(sidecar.url + "/", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(payload))
        assert await response.read() == payload
    assert upstream.last.get("Accept-Encoding") == "gzip"


async def test_gzip_request_body_passes_byte_for_byte(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    payload = gzip.compress(b"line of text\n" * 1000, mtime=0)
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    async with client.post(sidecar.url + "/upload", data=payload,
                           headers={"Content-Encoding": "gzip"}) as response:
        assert response.status == 200
    assert upstream.last.get("Content-Encoding") == "gzip"
    assert upstream.last.get("Content-Length") == str(len(payload))
    assert upstream.last.body == payload


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("total", [10, 200 * 1024 + 3])
async def test_chunked_request_body_is_forwarded(
    sidecar: InProcessSidecar, client: aiohttp.ClientSession, total: int,
) -> None:
    data = os.urandom(total)
    async with client.post(sidecar.url + "/echo", data=_chunks(data, 4096)) as response:
        assert response.status == 200
        echo = await response.json()
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert echo["body_bytes"] == total
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()


async def test_chunked_request_body_exact_bytes(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    upstream = await raw_upstream()
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    response = await one(sidecar.url, (
        b"POST /in HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n1\r\n\n\r\n0\r\n\r\n"))
    assert response.status == 200
    assert upstream.last.get("Transfer-Encoding") == "chunked"
    assert upstream.last.get("Content-Length") is None
    assert upstream.last.body == b"abc\n"


async def test_large_body_with_content_length_is_forwarded(
    sidecar: InProcessSidecar, client: aiohttp.ClientSession,
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 1)
    async with client.put(sidecar.url + "/echo", data=io.BytesIO(data),
                          headers={"Content-Length": str(len(data))}) as response:
        echo = await response.json()
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in headers
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()


# --- bodiless responses ------------------------------------------------------------------------


async def test_head_keeps_content_length_and_sends_no_body(
    sidecar: InProcessSidecar, backend: Backend,
) -> None:
    head, get, head_again = await raw_exchange(sidecar.url, [
        b"HEAD /bytes/1000 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /bytes/10 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"HEAD /bytes/77 HTTP/1.1\r\nHost: h\r\n\r\n",
    ], no_body=(True, False, True))
    assert head.status == 200
    assert head.get("Content-Length") == "1000"
    # had the sidecar sent a body after HEAD, it would be read here as the next status line
    assert get.status == 200
    assert get.body == b"\x00\x01\x02\x03" * 2 + b"\x00\x01"
    assert head_again.get("Content-Length") == "77"
    assert backend.calls("HEAD /bytes/1000") == 1


async def test_204_and_304_have_no_body(
    sidecar_factory: StartSidecar, raw_upstream: StartRaw, redis_url: str,
) -> None:
    async def handle(request: Message, writer: asyncio.StreamWriter) -> None:
        if request.start.startswith("DELETE"):
            writer.write(b"HTTP/1.1 204 No Content\r\nX-Deleted: yes\r\n\r\n")
        else:
            writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        await writer.drain()

    upstream = await raw_upstream(handle)
    sidecar = await _sidecar(sidecar_factory, upstream.url, redis_url)
    deleted, not_modified, after = await raw_exchange(sidecar.url, [
        b"DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n",
        b'GET /x HTTP/1.1\r\nHost: h\r\nIf-None-Match: "v1"\r\n\r\n',
        b"DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n",
    ], no_body=(True, True, True))
    assert deleted.status == 204
    assert deleted.get("X-Deleted") == "yes"
    assert "transfer-encoding" not in deleted.names()
    assert deleted.get("Content-Length") in (None, "0")
    assert not_modified.status == 304
    assert not_modified.get("ETag") == '"v1"'
    assert "transfer-encoding" not in not_modified.names()
    assert after.status == 204  # framing intact: the third answer parses as a response
    assert len(upstream.requests) == 3
    assert upstream.requests[1].get("If-None-Match") == '"v1"'


async def test_304_from_the_example_backend(
    sidecar: InProcessSidecar, client: aiohttp.ClientSession,
) -> None:
    async with client.get(sidecar.url + "/api/products/5") as response:
        etag = response.headers["ETag"]
        await response.read()
    async with client.get(sidecar.url + "/api/products/5",
                          headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert response.headers["ETag"] == etag
        assert await response.read() == b""
