"""`idempotency` end to end: a real upstream that counts its calls, real Redis (killed in the
fault tests), real clients, one or two sidecar instances. One test per rule of
docs/idempotency.md."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from support import (
    InProcessSidecar,
    Origin,
    RedisServer,
    SidecarProcess,
    free_port,
    make_config,
    until,
)

Factory = Callable[..., Awaitable[InProcessSidecar]]
KEY = "Idempotency-Key"


def idem_config(upstream_url: str, redis_url: str, *, route: dict[str, Any] | None = None,
                **idempotency: Any) -> dict[str, Any]:
    routes = [{"name": "orders", "match": {"path": "/**"}, "upstream": "app",
               "idempotency": idempotency, **(route or {})}]
    return make_config(upstream_url, redis_url, routes=routes)


async def start(factory: Factory, origin: Origin, redis_url: str, name: str = "config.yaml",
                **kwargs: Any) -> InProcessSidecar:
    return await factory(idem_config(origin.url, redis_url, **kwargs), name)


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def replayed(self) -> bool:
        return self.headers.get("X-Sidecar-Dedup") == "replay"

    @property
    def error(self) -> str:
        return str(json_of(self)["error"])


def json_of(reply: Reply) -> dict[str, Any]:
    data = json.loads(reply.body)
    assert set(data) == {"error", "detail", "request_id"}
    assert data["request_id"] == reply.headers["X-Request-ID"]
    return data  # type: ignore[no-any-return]


async def send(client: aiohttp.ClientSession, url: str, key: str | None = "k-1",
               body: Any = b"{}", method: str = "POST",
               headers: dict[str, str] | None = None) -> Reply:
    sent = CIMultiDict(headers or {})
    if key is not None:
        sent[KEY] = key
    async with client.request(method, url, data=body, headers=sent) as response:
        return Reply(response.status, response.headers, await response.read())


async def events(sidecar: InProcessSidecar, event: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            sidecar.admin_url + "/admin/stats") as response:
        stats = await response.json()
    return sum(e["count"] for e in stats["dedup"]["events"]
               if e["event"] == event and e["route"] == "orders")



async def records(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return len(await client.keys("sidecar:idem:*"))
    finally:
        await client.aclose()


def holding(gate: asyncio.Event, first_only: bool = True
            ) -> Callable[[web.Request, int], Awaitable[web.StreamResponse]]:
    """An upstream answer held back until the test opens `gate` (the first call only)."""
    async def answer(request: web.Request, n: int) -> web.Response:
        if n == 1 or not first_only:
            await gate.wait()
        return web.Response(status=201, text=f"order #{n}")

    return answer


# -- replay ----------------------------------------------------------------------------------------


async def test_a_retry_gets_the_stored_response_marked_as_a_replay(sidecar_factory, origin,
                                                                   redis_url, client):
    origin.reply("/orders", status=201, headers={"Location": "/orders/7", "X-Order": "7"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await send(client, sidecar.url + "/orders")
    retry = await send(client, sidecar.url + "/orders")
    assert (first.status, first.body) == (201, b"/orders #1")
    assert not first.replayed and "Idempotent-Replayed" not in first.headers
    assert (retry.status, retry.body) == (201, b"/orders #1")
    assert retry.replayed and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.headers["Location"] == "/orders/7" and retry.headers["X-Order"] == "7"
    assert retry.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert origin.calls["/orders"] == 1
    assert await events(sidecar, "idempotency_leader") == 1
    assert await events(sidecar, "replay") == 1


async def test_a_streamed_response_is_stored_whole_and_replayed(sidecar_factory, origin,
                                                                redis_url, client):
    big = os.urandom(300 * 1024)  # past 256 KiB the upstream response streams

    async def chunked(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        for i in range(0, len(big), 64 * 1024):
            await response.write(big[i:i + 64 * 1024])
        await response.write_eof()
        return response

    origin.script("/export", chunked)
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await send(client, sidecar.url + "/export")
    retry = await send(client, sidecar.url + "/export")
    assert first.body == big and retry.body == big and retry.replayed
    assert origin.calls["/export"] == 1


async def test_a_retry_while_the_first_is_in_flight_gets_409(sidecar_factory, origin,
                                                             redis_url, client):
    gate = asyncio.Event()
    origin.script("/orders", holding(gate))
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = asyncio.ensure_future(send(client, sidecar.url + "/orders"))
    await until(lambda: origin.calls["/orders"] == 1)
    retry = await send(client, sidecar.url + "/orders")
    assert retry.status == 409 and retry.error == "idempotency_key_in_use"
    assert "in progress" in json_of(retry)["detail"]
    gate.set()
    assert (await first).status == 201
    again = await send(client, sidecar.url + "/orders")
    assert (again.status, again.body, again.replayed) == (201, b"order #1", True)
    assert origin.calls["/orders"] == 1
    assert await events(sidecar, "conflict") == 1


async def test_the_same_key_with_another_request_gets_422(sidecar_factory, origin, redis_url,
                                                          client):
    origin.reply("/orders", status=201)
    sidecar = await start(sidecar_factory, origin, redis_url)
    assert (await send(client, sidecar.url + "/orders", body=b'{"qty": 1}')).status == 201
    for url, body, method in ((sidecar.url + "/orders", b'{"qty": 2}', "POST"),
                              (sidecar.url + "/orders?dry_run=1", b'{"qty": 1}', "POST"),
                              (sidecar.url + "/orders", b'{"qty": 1}', "PATCH")):
        reply = await send(client, url, body=body, method=method)
        assert reply.status == 422 and reply.error == "idempotency_key_reused"
    assert origin.calls["/orders"] == 1
    assert await events(sidecar, "mismatch") == 3


async def test_concurrent_and_repeated_requests_reach_the_upstream_once_per_key(
        sidecar_factory, origin, redis_url):
    seen: list[str] = []

    async def record(request: web.Request, n: int) -> web.Response:
        seen.append(request.headers[KEY])
        await asyncio.sleep(0.05)
        return web.Response(status=201, text=f"order for {request.headers[KEY]}")

    origin.script("/orders", record)
    sidecar = await start(sidecar_factory, origin, redis_url)
    keys = [f"key-{i}" for i in range(5)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        burst = await asyncio.gather(*(send(session, sidecar.url + "/orders", key)
                                       for key in keys for _ in range(8)))
        later = await asyncio.gather(*(send(session, sidecar.url + "/orders", key)
                                       for key in keys))
    assert sorted(seen) == keys
    assert {r.status for r in burst} <= {201, 409}
    assert sum(r.status == 201 and not r.replayed for r in burst) == 5
    for key, reply in zip(keys, later, strict=True):
        assert (reply.status, reply.body, reply.replayed) == (
            201, f"order for {key}".encode(), True)


# -- scope and lifetime ----------------------------------------------------------------------------


async def test_keys_are_scoped_by_credentials(sidecar_factory, origin, redis_url, client):
    origin.reply("/orders", status=201)
    sidecar = await start(sidecar_factory, origin, redis_url)
    url = sidecar.url + "/orders"
    alice = await send(client, url, headers={"Authorization": "Bearer alice"})
    bob = await send(client, url, headers={"Authorization": "Bearer bob"})
    anonymous = await send(client, url)
    cookie = await send(client, url, headers={"Cookie": "session=carol"})
    assert [r.body for r in (alice, bob, anonymous, cookie)] == [
        b"/orders #1", b"/orders #2", b"/orders #3", b"/orders #4"]
    assert not any(r.replayed for r in (alice, bob, anonymous, cookie))
    again = await send(client, url, headers={"Authorization": "Bearer alice"})
    assert (again.body, again.replayed) == (b"/orders #1", True)
    assert origin.calls["/orders"] == 4


async def test_keys_are_scoped_by_route(sidecar_factory, origin, redis_url, client):
    origin.reply("/a/orders", status=201)
    origin.reply("/b/orders", status=201)
    routes = [{"name": name, "match": {"path": f"/{name}/**"}, "upstream": "app",
               "idempotency": {}} for name in ("a", "b")]
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=routes))
    # Without the route in the record key the second request would be a 422 (another target).
    assert (await send(client, sidecar.url + "/a/orders")).status == 201
    other = await send(client, sidecar.url + "/b/orders")
    assert (other.status, other.replayed) == (201, False)
    assert origin.calls["/a/orders"] == origin.calls["/b/orders"] == 1


async def test_a_record_expires_after_ttl(sidecar_factory, origin, redis_url, client):
    origin.reply("/orders", status=201)
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="1s")
    assert (await send(client, sidecar.url + "/orders")).body == b"/orders #1"
    assert (await send(client, sidecar.url + "/orders")).replayed
    # Redis keeps the record for the route's ttl and drops it then; the test ends that
    # lifetime itself rather than sleeping through it.
    store = aioredis.Redis.from_url(redis_url)
    try:
        names = await store.keys("sidecar:idem:*")
        assert names and all([0 < await store.pttl(name) <= 1000 for name in names])
        await store.delete(*names)
    finally:
        await store.aclose()
    later = await send(client, sidecar.url + "/orders")
    assert (later.body, later.replayed) == (b"/orders #2", False)
    assert origin.calls["/orders"] == 2


async def test_two_instances_sharing_redis_replay_each_others_responses(sidecar_factory, origin,
                                                                        redis_url, client):
    origin.reply("/orders", status=201)
    one = await start(sidecar_factory, origin, redis_url, "one.yaml")
    two = await start(sidecar_factory, origin, redis_url, "two.yaml")
    first = await send(client, one.url + "/orders")
    retry = await send(client, two.url + "/orders")
    assert (retry.status, retry.body, retry.replayed) == (201, first.body, True)
    assert origin.calls["/orders"] == 1


# -- bodies ----------------------------------------------------------------------------------------


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 16 * 1024):
        yield data[i:i + 16 * 1024]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_large_body_is_fingerprinted_and_forwarded_intact(sidecar_factory, origin,
                                                                  redis_url, client, framing):
    body = os.urandom(200 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    received: list[tuple[str, str | None, str | None]] = []  # what the upstream got

    async def echo_digest(request: web.Request, n: int) -> web.Response:
        data = await request.read()
        received.append((hashlib.sha256(data).hexdigest(), request.headers.get("Content-Length"),
                         request.headers.get("Transfer-Encoding")))
        return web.Response(status=201, text=hashlib.sha256(data).hexdigest())

    origin.script("/upload", echo_digest)
    sidecar = await start(sidecar_factory, origin, redis_url)

    def payload(data: bytes) -> Any:
        return data if framing == "content-length" else _chunks(data)

    first = await send(client, sidecar.url + "/upload", body=payload(body))
    assert first.status == 201 and first.body == digest.encode()
    assert received == [(digest, str(len(body)), None)]
    retry = await send(client, sidecar.url + "/upload", body=payload(body))
    assert (retry.status, retry.body, retry.replayed) == (201, first.body, True)
    changed = body[:-1] + bytes([body[-1] ^ 1])  # the last byte counts too
    mismatch = await send(client, sidecar.url + "/upload", body=payload(changed))
    assert mismatch.status == 422
    assert origin.calls["/upload"] == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_max_body_gets_413(sidecar_factory, origin, redis_url, client,
                                             framing):
    origin.reply("/upload", status=201)
    sidecar = await start(sidecar_factory, origin, redis_url, max_body="100KiB")
    body = os.urandom(200 * 1024)
    reply = await send(client, sidecar.url + "/upload",
                       body=body if framing == "content-length" else _chunks(body))
    assert reply.status == 413 and reply.error == "request_body_too_large"
    small = await send(client, sidecar.url + "/upload", key="k-2", body=body[:1000])
    assert small.status == 201
    assert origin.calls["/upload"] == 1


@pytest.mark.parametrize("value", ["", "   ", "x" * 256])
async def test_a_malformed_key_gets_400(sidecar_factory, origin, redis_url, client, value):
    origin.reply("/orders", status=201)
    sidecar = await start(sidecar_factory, origin, redis_url)
    reply = await send(client, sidecar.url + "/orders", key=value)
    assert reply.status == 400 and reply.error == "idempotency_key_invalid"
    assert origin.calls["/orders"] == 0


async def test_two_key_headers_get_400(sidecar_factory, origin, redis_url, client):
    origin.reply("/orders", status=201)
    sidecar = await start(sidecar_factory, origin, redis_url)
    headers = CIMultiDict([(KEY, "a"), (KEY, "b")])
    async with client.post(sidecar.url + "/orders", data=b"{}", headers=headers) as response:
        assert response.status == 400
    assert (await send(client, sidecar.url + "/orders", key="x" * 255)).status == 201


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_response_too_large_to_store_is_delivered_but_not_replayed(
        sidecar_factory, origin, redis_url, client, streamed):
    big = os.urandom(300 * 1024 if streamed else 8 * 1024)

    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        if not streamed:
            return web.Response(status=201, body=big)
        response = web.StreamResponse(status=201)
        await response.prepare(request)
        for i in range(0, len(big), 16 * 1024):
            await response.write(big[i:i + 16 * 1024])
        await response.write_eof()
        return response

    origin.script("/export", answer)
    sidecar = await start(sidecar_factory, origin, redis_url, max_response="4KiB")
    first = await send(client, sidecar.url + "/export")
    assert (first.status, first.body) == (201, big)
    retry = await send(client, sidecar.url + "/export")
    assert retry.status == 409 and retry.error == "idempotency_key_in_use"
    assert "too large" in json_of(retry)["detail"]
    assert origin.calls["/export"] == 1


# -- failures --------------------------------------------------------------------------------------


async def test_an_upstream_timeout_frees_the_key_for_the_retry(sidecar_factory, origin,
                                                               redis_url, client):
    async def slow_first(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(1.0 if n == 1 else 0)
        return web.Response(status=201, text=f"order #{n}")

    origin.script("/orders", slow_first)
    sidecar = await start(sidecar_factory, origin, redis_url, route={"timeout": "300ms"})
    first = await send(client, sidecar.url + "/orders")
    assert first.status == 504 and first.error == "upstream_timeout"
    retry = await send(client, sidecar.url + "/orders")
    assert (retry.status, retry.body, retry.replayed) == (201, b"order #2", False)
    again = await send(client, sidecar.url + "/orders")
    assert (again.body, again.replayed) == (b"order #2", True)


async def test_a_503_from_the_upstream_is_not_replayed(sidecar_factory, origin, redis_url,
                                                        client):
    async def busy_first(request: web.Request, n: int) -> web.Response:
        return web.Response(status=503 if n == 1 else 201, text=f"order #{n}")

    origin.script("/orders", busy_first)
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await send(client, sidecar.url + "/orders")
    assert (first.status, first.replayed) == (503, False)
    retry = await send(client, sidecar.url + "/orders")
    assert (retry.status, retry.body, retry.replayed) == (201, b"order #2", False)
    assert (await send(client, sidecar.url + "/orders")).replayed


async def test_an_unreachable_upstream_frees_the_key(sidecar_factory, redis_url, client):
    closed = f"http://127.0.0.1:{free_port()}"
    sidecar = await sidecar_factory(idem_config(closed, redis_url))
    reply = await send(client, sidecar.url + "/orders")
    assert reply.status == 502 and reply.error == "upstream_connect_error"
    assert await records(redis_url) == 0
    assert (await send(client, sidecar.url + "/orders")).status == 502  # not 409


async def test_a_dead_leader_blocks_the_key_for_one_lease_only(sidecar_factory, sidecar_process,
                                                               origin, redis_url):
    gate = asyncio.Event()
    origin.script("/orders", holding(gate))
    config = idem_config(origin.url, redis_url, route={"timeout": "1500ms"})
    leader: SidecarProcess = sidecar_process(config, "leader.yaml")
    other = await start(sidecar_factory, origin, redis_url, "other.yaml",
                        route={"timeout": "1500ms"})
    async with aiohttp.ClientSession() as session:
        lead = asyncio.ensure_future(send(session, leader.url + "/orders"))
        await until(lambda: origin.calls["/orders"] == 1)
        leader.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        blocked = await send(session, other.url + "/orders")
        assert blocked.status == 409
        while (reply := await send(session, other.url + "/orders")).status == 409:
            assert time.monotonic() - killed < 5
            await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientError):
            await lead
    assert (reply.status, reply.body, reply.replayed) == (201, b"order #2", False)
    gate.set()


async def test_with_redis_down_requests_are_forwarded(sidecar_factory, origin,
                                                      own_redis: RedisServer, client):
    origin.reply("/orders", status=201)
    sidecar = await start(sidecar_factory, origin, own_redis.url)
    own_redis.kill()
    # The first request may find Redis down itself, before the health check does.
    replies = [await send(client, sidecar.url + "/orders") for _ in range(3)]
    assert [(r.status, r.replayed) for r in replies] == [(201, False)] * 3
    assert origin.calls["/orders"] == 3
    assert await events(sidecar, "idempotency_bypass") == 3
    own_redis.start()
    deadline = time.monotonic() + 10
    while not (await send(client, sidecar.url + "/orders", key="after")).replayed:
        assert time.monotonic() < deadline, "enforcement did not resume with Redis back"
        await asyncio.sleep(0.1)


# -- what passes untouched -------------------------------------------------------------------------


async def test_unlisted_methods_and_requests_without_a_key_pass_through(sidecar_factory, origin,
                                                                        redis_url, client):
    origin.reply("/orders", status=200)
    sidecar = await start(sidecar_factory, origin, redis_url, methods=["post"])
    url = sidecar.url + "/orders"
    replies = [await send(client, url, method="PUT"), await send(client, url, method="PUT"),
               await send(client, url, method="PATCH"), await send(client, url, method="PATCH"),
               await send(client, url, key=None), await send(client, url, key=None),
               await send(client, url, key="", method="PUT")]
    assert [r.body for r in replies] == [f"/orders #{n}".encode() for n in range(1, 8)]
    assert not any(r.replayed for r in replies)
    assert origin.seen["/orders"][KEY] == ""  # the header itself is forwarded as sent
    assert await records(redis_url) == 0
    assert await events(sidecar, "idempotency_leader") == 0
