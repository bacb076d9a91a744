"""Response bodies that end when the upstream closes the connection (RFC 9112 §6.3 rules 4 and
7: no Content-Length, no final chunked), through a real sidecar with raw sockets on both sides:
relayed whole (chunked to HTTP/1.1, by close to HTTP/1.0), stored by a cached route, never taken
as whole when the connection is reset; and the transfer codings the sidecar cannot pass on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import pytest
from support import (
    Conn,
    InProcessSidecar,
    Script,
    ScriptedUpstream,
    make_config,
    read_responses,
    read_until_closed,
)

from sidecar.http.headers import response_codings

StartSidecar = Callable[..., Awaitable[InProcessSidecar]]
StartScripted = Callable[[Script], Awaitable[ScriptedUpstream]]


# --- which codings a body carries (no I/O) -----------------------------------------------------


@pytest.mark.parametrize(("values", "chunked", "left"), [
    ([], False, ()),
    ([b"chunked"], True, ()),
    ([b"CHUNKED"], True, ()),
    ([b"identity"], False, ()),
    ([b"gzip"], False, (b"gzip",)),
    ([b"gzip, chunked"], True, (b"gzip",)),
    ([b"gzip", b"chunked"], True, (b"gzip",)),
    ([b"chunked", b"gzip"], False, (b"chunked", b"gzip")),
    ([b"chunked, chunked"], True, (b"chunked",)),
    ([b"chunked , "], False, (b"chunked",)),
    ([b"chunked;q=1"], False, (b"chunked;q=1",)),
    ([b"xchunked"], False, (b"xchunked",)),
    ([b"identity, chunked"], True, ()),
])
def test_response_codings(values: list[bytes], chunked: bool, left: tuple[bytes, ...]) -> None:
    assert response_codings(values) == (chunked, left)


class _Body:
    def __init__(self) -> None:
        self.body = b""
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


@pytest.mark.parametrize("values", [
    [b"chunked"], [b"Chunked "], [b"gzip,chunked"], [b"gzip ,\tchunked"], [b"chunked, gzip"],
    [b"chunked , "], [b"chunked;q=1"], [b"xchunked"], [b"chunked", b"gzip"],
    [b"gzip", b"chunked"], [b"identity"], [b"x chunked"],
])
def test_chunked_final_is_what_the_parser_undoes(values: list[bytes]) -> None:
    """The sidecar's reading of "chunked is final" must be llhttp's: otherwise a body the parser
    reads to the close could be taken for one it decoded, or the other way round."""
    seen = _Body()
    parser = httptools.HttpResponseParser(seen)
    fields = b"".join(b"Transfer-Encoding: " + value + b"\r\n" for value in values)
    parser.feed_data(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    decoded = seen.complete and seen.body == b"hello"
    assert response_codings(values)[0] == decoded


# --- relayed ------------------------------------------------------------------------------------


def _until_close(head: bytes, body: bytes, *, reset_after: int | None = None) -> Script:
    """Answer every request with `head` and `body`, then close (or reset, after that many body
    bytes). Each request on its own connection, as a close-delimited body needs."""
    async def serve(conn: Conn) -> None:
        request = await conn.read_request()
        if request is None:
            return
        if reset_after is None:
            await conn.send(head + body)
            await conn.finish()
        else:
            await conn.send(head + body[:reset_after])
            await asyncio.sleep(0.2)
            conn.reset()

    return serve


async def _sidecar(sidecar_factory: StartSidecar, upstream: ScriptedUpstream, redis_url: str,
                   **route: Any) -> InProcessSidecar:
    routes = [{"name": "r", "match": {"path": "/**"}, "upstream": "app", **route}]
    return await sidecar_factory(make_config(upstream.url, redis_url, routes=routes))


async def _get(sidecar: InProcessSidecar, version: bytes = b"1.1", count: int = 1,
               path: bytes = b"/doc"):  # type: ignore[no-untyped-def]
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        request = b"GET " + path + b" HTTP/" + version + b"\r\nHost: x\r\n\r\n"
        writer.write(request * count)
        if version == b"1.0":
            return await read_until_closed(reader)
        return await read_responses(reader, count)
    finally:
        writer.close()


@pytest.mark.parametrize("head", [
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
], ids=["http10", "connection-close", "bare", "te-identity"])
async def test_a_body_ending_with_the_connection_is_relayed_whole(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
        head: bytes) -> None:
    upstream = await scripted(_until_close(head, b"hello, world"))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    parsed = await _get(sidecar, count=2)  # the second on the same client connection
    assert parsed.statuses == [200, 200]
    assert parsed.bodies == [b"hello, world"] * 2
    assert "transfer-encoding" not in parsed.headers[0] or (
        parsed.headers[0]["transfer-encoding"] == "chunked")
    assert upstream.connections == 2  # never reused: that connection ended the body


async def test_a_large_body_ending_with_the_connection_streams_chunked(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    body = os.urandom(3 * 1024 * 1024)
    upstream = await scripted(_until_close(b"HTTP/1.0 200 OK\r\n\r\n", body))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    parsed = await _get(sidecar)
    assert parsed.statuses == [200]
    assert parsed.headers[0]["transfer-encoding"] == "chunked"
    assert "content-length" not in parsed.headers[0]
    assert parsed.bodies[0] == body


async def test_an_http10_client_gets_it_by_close(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    body = os.urandom(1024 * 1024)
    upstream = await scripted(_until_close(b"HTTP/1.0 200 OK\r\n\r\n", body))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    parsed = await _get(sidecar, b"1.0")
    assert parsed.statuses == [200]
    assert "transfer-encoding" not in parsed.headers[0]
    assert parsed.headers[0]["connection"] == "close"
    assert parsed.bodies[0] == body


async def test_a_cached_route_stores_it_and_serves_it_with_a_length(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    body = os.urandom(300 * 1024)  # past the 256 KiB the upstream reader holds before pausing
    upstream = await scripted(_until_close(
        b"HTTP/1.0 200 OK\r\nCache-Control: max-age=60\r\n\r\n", body))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url, cache={"ttl": "60s"})
    miss = await _get(sidecar)
    hit = await _get(sidecar)
    assert miss.bodies == [body] and "stored" in miss.headers[0]["cache-status"]
    assert hit.bodies == [body]
    assert hit.headers[0]["cache-status"].startswith("sidecar; hit")
    assert hit.headers[0]["content-length"] == str(len(body))
    assert upstream.connections == 1


async def test_a_reset_is_not_the_end_of_the_body(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    """Only the upstream's close (FIN) ends such a body: a reset mid-way is a failure, so the
    client sees a cut response (here a 502, as the cache reads it whole first), and nothing
    truncated is stored."""
    upstream = await scripted(_until_close(
        b"HTTP/1.0 200 OK\r\nCache-Control: max-age=60\r\n\r\n", b"x" * 10_000,
        reset_after=1000))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url, cache={"ttl": "60s"})
    for _ in range(2):
        parsed = await _get(sidecar)
        assert parsed.statuses == [502]
    assert upstream.connections == 2  # not stored: asked again


async def test_a_reset_cuts_a_streamed_body_short(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    upstream = await scripted(_until_close(b"HTTP/1.0 200 OK\r\n\r\n", b"x" * 500_000,
                                           reset_after=300_000))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)
    try:
        writer.write(b"GET /doc HTTP/1.1\r\nHost: x\r\n\r\n")
        parsed = await read_until_closed(reader)
    finally:
        writer.close()
    assert parsed.statuses == [200]
    assert parsed.done == 0  # no last chunk: the client cannot take it for the whole body
    assert len(parsed.bodies[0]) <= 300_000


# --- transfer codings -----------------------------------------------------------------------------


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
], ids=["gzip", "gzip-chunked", "chunked-twice"])
async def test_a_transfer_coding_the_sidecar_did_not_ask_for_is_a_502(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str,
        head: bytes) -> None:
    """The sidecar sends no TE, the only coding it takes is chunked (RFC 9110 §10.1.4);
    one it did is neither undone nor passed on as if it were the content."""
    upstream = await scripted(_until_close(head, b"\x1f\x8b binary"))
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url, cache={"ttl": "60s"})
    for _ in range(2):
        parsed = await _get(sidecar)
        assert parsed.statuses == [502]
        assert b"transfer coding" in parsed.bodies[0]
    assert upstream.connections == 2
