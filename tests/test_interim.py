"""Interim responses (RFC 9110 §15.2: 1xx but 101) through a real sidecar: passed on to an
HTTP/1.1 client as they come, ahead of the answer and apart from it, never stored, never to an
HTTP/1.0 client; raw sockets on both sides, to see the exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from support import (
    Conn,
    InProcessSidecar,
    Script,
    ScriptedUpstream,
    make_config,
    read_responses,
    read_until_closed,
)

StartSidecar = Callable[..., Awaitable[InProcessSidecar]]
StartScripted = Callable[[Script], Awaitable[ScriptedUpstream]]

EARLY_HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n"
               b"Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n\r\nok"
GET = b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n"


async def _sidecar(sidecar_factory: StartSidecar, upstream: ScriptedUpstream, redis_url: str,
                   **route: Any) -> InProcessSidecar:
    routes = [{"name": "r", "match": {"path": "/**"}, "upstream": "app", **route}]
    return await sidecar_factory(make_config(upstream.url, redis_url, routes=routes))


async def _connect(sidecar: InProcessSidecar) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", sidecar.runtime.public_port)


async def test_early_hints_reach_the_client_before_the_answer_and_apart_from_it(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    """The 103 is on the client's socket while the upstream still holds the 200 back; its
    hop-by-hop fields are dropped, Via added; the 200 does not carry its Link."""
    relayed = asyncio.Event()

    async def hints_then_answer(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(EARLY_HINTS)
            await asyncio.wait_for(relayed.wait(), 5)
            await conn.send(OK)

    upstream = await scripted(hints_then_answer)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    reader, writer = await _connect(sidecar)
    try:
        writer.write(GET)
        interim = await read_responses(reader, 1)
        relayed.set()
        final = await read_responses(reader, 1)
    finally:
        writer.close()
    assert interim.statuses == [103]
    assert interim.headers[0]["link"] == "</style.css>; rel=preload; as=style"
    assert interim.headers[0]["via"] == "1.1 sidecar"
    assert not {"x-hop", "keep-alive", "connection", "content-length"} & set(interim.headers[0])
    assert (final.statuses, final.bodies) == ([200], [b"ok"])
    assert "link" not in final.headers[0]


async def test_several_102_processing_are_relayed_in_order(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    async def processing(conn: Conn) -> None:
        while await conn.read_request() is not None:
            for _ in range(3):
                await conn.send(b"HTTP/1.1 102 Processing\r\n\r\n")
                await asyncio.sleep(0.02)
            await conn.send(OK)

    upstream = await scripted(processing)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    reader, writer = await _connect(sidecar)
    try:
        writer.write(GET)
        parsed = await read_responses(reader, 4)
    finally:
        writer.close()
    assert parsed.statuses == [102, 102, 102, 200]
    assert parsed.bodies[-1] == b"ok"


async def test_a_cached_route_relays_early_hints_on_the_miss_and_never_stores_them(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    async def hints_then_answer(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            upstream.requests.append(request)
            await conn.send(EARLY_HINTS + OK)

    upstream = await scripted(hints_then_answer)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url, cache={"ttl": "60s"})
    reader, writer = await _connect(sidecar)
    try:
        writer.write(GET)
        miss = await read_responses(reader, 2)
        writer.write(GET)
        hit = await read_responses(reader, 1)
    finally:
        writer.close()
    assert miss.statuses == [103, 200]
    assert "stored" in miss.headers[1]["cache-status"]
    assert hit.statuses == [200] and hit.bodies == [b"ok"]
    assert hit.headers[0]["cache-status"].startswith("sidecar; hit")
    assert "link" not in hit.headers[0] and "link" not in miss.headers[1]
    assert len(upstream.requests) == 1


async def test_an_http10_client_gets_no_interim_response(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    async def hints_then_answer(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(EARLY_HINTS + b"HTTP/1.1 102 Processing\r\n\r\n" + OK)

    upstream = await scripted(hints_then_answer)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    reader, writer = await _connect(sidecar)
    try:
        writer.write(b"GET /page HTTP/1.0\r\nHost: x\r\n\r\n")
        parsed = await read_until_closed(reader)
    finally:
        writer.close()
    assert (parsed.statuses, parsed.bodies) == ([200], [b"ok"])


async def test_an_upstream_100_continue_is_relayed_unless_the_edge_sent_one(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    """The upstream never sees Expect (the edge answers it), but may send 100 anyway: a client
    that asked gets the edge's 100 and no second one; one that did not ask gets the
    upstream's."""
    async def continue_then_answer(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)

    upstream = await scripted(continue_then_answer)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    reader, writer = await _connect(sidecar)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        edge_continue = await read_responses(reader, 1)
        writer.write(b"hello")
        asked = await read_responses(reader, 1)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        unasked = await read_responses(reader, 2)
    finally:
        writer.close()
    assert edge_continue.statuses == [100]
    assert asked.statuses == [200]  # nothing between the edge's 100 and the answer
    assert unasked.statuses == [100, 200]


async def test_an_interim_response_then_a_failure_is_a_1xx_then_a_502(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    async def hints_then_close(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(EARLY_HINTS)
        await conn.finish()

    upstream = await scripted(hints_then_close)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url)
    reader, writer = await _connect(sidecar)
    try:
        writer.write(GET)
        parsed = await read_responses(reader, 2)
    finally:
        writer.close()
    assert parsed.statuses == [103, 502]
    assert b"upstream" in parsed.bodies[1]


async def test_a_background_revalidation_sends_its_1xx_to_no_one(
        sidecar_factory: StartSidecar, scripted: StartScripted, redis_url: str) -> None:
    """stale-while-revalidate answers the client at once and refreshes behind its back: a 103
    that comes with the refresh arrives while the client's connection serves its next request,
    and must not be written into that one's answer."""
    next_seen = asyncio.Event()
    hinted = asyncio.Event()
    calls = {"/page": 0}

    async def serve(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.startswith(b"GET /next "):
                next_seen.set()
                await asyncio.wait_for(hinted.wait(), 5)
                await asyncio.sleep(0.1)  # the 103 has reached the sidecar meanwhile
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n"
                                b"Cache-Control: no-store\r\n\r\nnext")
                continue
            calls["/page"] += 1
            if calls["/page"] == 1:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                b"Cache-Control: max-age=1, stale-while-revalidate=30\r\n\r\nv1")
                continue
            await asyncio.wait_for(next_seen.wait(), 5)  # the refresh, behind the client's back
            await conn.send(EARLY_HINTS)
            hinted.set()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                            b"Cache-Control: max-age=60\r\n\r\nv2")

    upstream = await scripted(serve)
    sidecar = await _sidecar(sidecar_factory, upstream, redis_url, cache={"ttl": "1s"})
    reader, writer = await _connect(sidecar)
    try:
        writer.write(GET)
        first = await read_responses(reader, 1)
        await asyncio.sleep(1.2)
        writer.write(GET)
        stale = await read_responses(reader, 1)
        writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        nxt = await read_responses(reader, 1)
    finally:
        writer.close()
    assert first.bodies == [b"v1"]
    assert stale.bodies == [b"v1"] and "stale-while-revalidate" in stale.headers[0]["cache-status"]
    assert hinted.is_set()
    assert (nxt.statuses, nxt.bodies) == ([200], [b"next"])
