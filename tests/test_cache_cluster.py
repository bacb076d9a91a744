"""One cache across workers and instances (docs/caching.md, "One cache across workers"): four
in-process runtimes on one real Redis, two per "instance", each with its own L1 and its own
subscription. A write answered on one is found by the others; an invalidation answered on one
is served by none; a worker cut off from Redis stops serving L1 within the lease."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from support import InProcessSidecar, Origin, RedisServer, gather_limited, until
from test_cache import SHOP, Factory, cache_config, fetch, purge, stats

from sidecar.core.freshness import Freshness
from sidecar.stores.entry import CachedResponse
from sidecar.stores.redis import WORKERS
from sidecar.stores.tiered import HEARTBEAT, LEASE, WRITE_WAIT, CacheService

PAIRS = 200


def numbered(request: web.Request, n: int) -> web.Response:
    """Every GET answer is new (the call number), and stored for a minute; a POST succeeds."""
    if request.method != "GET":
        return web.Response(text="done")
    return web.Response(text=f"{request.query_string} #{n}",
                        headers={"Cache-Control": "max-age=60"})


async def cluster(factory: Factory, origin: Origin, redis_url: str) -> list[InProcessSidecar]:
    """a1, a2 (instance A), b1, b2 (instance B), each subscribed and serving L1."""
    for path in ("/w", "/i"):
        async def answer(request: web.Request, n: int) -> web.Response:
            return numbered(request, n)
        origin.script(path, answer)
    route = {"match": {"path": "/**", "methods": ["GET", "POST"]}}
    workers = [await factory(cache_config(origin, redis_url, route=route), f"{name}.yaml")
               for name in ("a1", "a2", "b1", "b2")]

    async def all_serving() -> bool:
        return all(time.monotonic() < w.runtime.cache.l1_until for w in workers)
    await until(all_serving)
    return workers


def slow_down(service: CacheService) -> None:
    apply = service.on_message

    async def late(data: bytes) -> None:
        await asyncio.sleep(0.005)
        await apply(data)
    service.on_message = late  # type: ignore[method-assign]


async def get(client: aiohttp.ClientSession, worker: InProcessSidecar, target: str) -> Any:
    return await fetch(client, worker.url + target, headers=SHOP)


async def test_a_write_answered_on_one_worker_is_read_on_any_other(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    a1, a2, b1, b2 = await cluster(sidecar_factory, origin, redis_url)
    pairs = [(a1, b1), (a2, b2), (b1, a2), (b2, a1)]
    missed = []
    for i in range(PAIRS):
        writer, reader = pairs[i % len(pairs)]
        target = f"/w?i={i}"
        first = await get(client, writer, target)
        assert "stored" in first.cache_status, first.cache_status
        second = await get(client, reader, target)   # as soon as the first answer is in
        if not second.hit or second.body != first.body:
            missed.append((target, second.cache_status))
    assert missed == []
    assert origin.calls["/w"] == PAIRS


async def test_an_invalidation_answered_on_one_worker_is_served_by_none(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    """Every worker holds the entry in L1; a POST (or an admin purge) answered on one, then a
    read on another must not get the old body. Half POSTs, half purges. Each worker applies
    purges 5 ms late, as a loaded one would: the answer must wait for them."""
    workers = await cluster(sidecar_factory, origin, redis_url)
    for worker in workers:
        slow_down(worker.runtime.cache)
    stale = []
    for i in range(PAIRS):
        target = f"/i?i={i}"
        writer = workers[i % 4]
        reader = workers[(i + 1 + i // 4 % 3) % 4]    # each of the other three in turn
        body = (await get(client, writer, target)).body
        for worker in workers:                        # from L2 into every L1
            reply = await get(client, worker, target)
            assert reply.hit and reply.body == body
        if i % 2:
            async with client.post(writer.url + target, headers=SHOP) as response:
                assert response.status == 200
        else:
            result = await purge(client, writer, key=target)
            assert result["instances_acked"] == result["instances_notified"] == 4
        reply = await get(client, reader, target)
        if reply.body == body:
            stale.append((target, reply.cache_status))
    assert stale == []
    reader_stats = [await stats(client, w) for w in workers]
    l1_hits = sum(row["count"] for s in reader_stats for row in s["requests"]
                  if row["layer"] == "memory" and row["result"] == "hit")
    assert l1_hits >= PAIRS  # the warm-up did fill (and hit) the L1s


async def test_a_purge_waits_for_a_silent_worker_no_longer_than_the_lease(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    """A worker registered but not answering (cut off, its Redis connection not yet seen as
    dead): the purge waits the lease out, by when that worker has stopped serving L1."""
    a1, *_ = await cluster(sidecar_factory, origin, redis_url)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await redis.zadd(WORKERS, {"silent": int(time.time() * 1000) + 60_000})
        started = time.monotonic()
        result = await purge(client, a1, key="/i?i=1")
        waited = time.monotonic() - started
    finally:
        await redis.aclose()
    assert result["instances_notified"] == 5 and result["instances_acked"] == 4
    assert LEASE <= waited < LEASE + 0.4


async def test_a_worker_cut_off_from_redis_stops_serving_l1_within_the_lease(
        sidecar_factory: Factory, origin: Origin, own_redis: RedisServer,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/warm", headers={"Cache-Control": "max-age=60"})
    config = cache_config(origin, own_redis.url)
    config["cache"] = {"l1_without_redis": "stop"}
    worker = await sidecar_factory(config)
    service = worker.runtime.cache

    async def serving() -> bool:
        return time.monotonic() < service.l1_until
    await until(serving)
    await fetch(client, worker.url + "/warm")
    assert (await fetch(client, worker.url + "/warm")).hit
    own_redis.kill()
    killed = time.monotonic()

    async def stopped() -> bool:
        return not await serving()
    await until(stopped)
    assert time.monotonic() - killed < LEASE + HEARTBEAT + 0.3
    reply = await fetch(client, worker.url + "/warm")
    assert not reply.hit and reply.status == 200      # from the upstream, not from L1
    assert origin.calls["/warm"] == 2

    own_redis.start()
    await until(serving)
    await fetch(client, worker.url + "/warm")         # L1 was emptied on reconnecting
    assert (await fetch(client, worker.url + "/warm")).hit


class _HangingStore:
    async def put(self, *args: Any, **kwargs: Any) -> int:
        await asyncio.Event().wait()
        return 0

    async def unregister(self, worker_id: str) -> None:
        pass


@pytest.mark.parametrize("hangs", [True, False])
async def test_an_answer_waits_for_its_l2_write_a_bounded_time(hangs: bool) -> None:
    service = CacheService()
    service.store = _HangingStore() if hangs else None  # type: ignore[assignment]
    service.redis_up = True
    entry = CachedResponse(key="k", uri="/", status=200, reason="OK", headers=[], body=b"x",
                           freshness=Freshness(60, 0, 0, False, False, 0, 0), vary_names=(),
                           vary_values=(), etag=None, last_modified=None, tags=())
    started = time.monotonic()
    written = await service.written(service.l2_put(entry, 60))
    waited = time.monotonic() - started
    await service.close()
    if hangs:
        assert not written and service.late_writes == 1
        assert WRITE_WAIT <= waited < WRITE_WAIT + 0.2
    else:
        assert written and waited < 0.05


# -- the acceptance figures, on real processes -------------------------------------------------

PROCESS_PAIRS = 1_000


@pytest.mark.slow
async def test_two_instances_of_two_workers_miss_no_write_and_serve_no_invalidated_entry(
        sidecar_process: Any, origin: Origin, redis_url: str) -> None:
    """Two `sidecar run` processes of two workers each on one Redis; every request on a new
    connection, so that the kernel spreads them over the workers. 1,000 store-then-read pairs
    across the instances, then 1,000 invalidate-then-read pairs, half by POST and half by purge,
    after both instances' workers have the entry in L1."""
    for path in ("/w", "/i"):
        async def answer(request: web.Request, n: int) -> web.Response:
            return numbered(request, n)
        origin.script(path, answer)
    route = {"match": {"path": "/**", "methods": ["GET", "POST"]}}
    instances = []
    for name in ("a", "b"):
        config = cache_config(origin, redis_url, route=route)
        config["server"] |= {"workers": 2, "watch_config": False}
        instances.append(sidecar_process(config, f"{name}.yaml"))
    a, b = instances

    redis = aioredis.Redis.from_url(redis_url)

    async def four_workers_registered() -> bool:
        return int(await redis.zcount(WORKERS, int(time.time() * 1000), "+inf")) == 4
    try:
        await until(four_workers_registered, 20)
    finally:
        await redis.aclose()

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as fresh:
        async def store_then_read(i: int) -> tuple[str, str] | None:
            writer, reader = (a, b) if i % 2 else (b, a)
            first = await fetch(fresh, f"{writer.url}/w?i={i}", headers=SHOP)
            assert "stored" in first.cache_status, first.cache_status
            second = await fetch(fresh, f"{reader.url}/w?i={i}", headers=SHOP)
            if not second.hit or second.body != first.body:
                return f"/w?i={i}", second.cache_status
            return None

        missed = [m for m in await gather_limited(
            [store_then_read(i) for i in range(PROCESS_PAIRS)], 8) if m]
        assert missed == []
        assert origin.calls["/w"] == PROCESS_PAIRS

        async def invalidate_then_read(i: int) -> tuple[str, str] | None:
            target = f"/i?i={i}"
            writer, reader = (a, b) if i % 2 else (b, a)
            body = (await fetch(fresh, writer.url + target, headers=SHOP)).body
            for instance in (a, b, a, b):        # into the L1 of (most often) every worker
                assert (await fetch(fresh, instance.url + target, headers=SHOP)).body == body
            if i % 4 < 2:
                async with fresh.post(writer.url + target, headers=SHOP) as response:
                    assert response.status == 200
            else:
                async with fresh.post(writer.admin_url + "/admin/cache/purge",
                                      json={"key": target}) as response:
                    assert response.status == 200
            for instance in (reader, writer):
                reply = await fetch(fresh, instance.url + target, headers=SHOP)
                if reply.body == body:
                    return target, reply.cache_status
            return None

        stale = [s for s in await gather_limited(
            [invalidate_then_read(i) for i in range(PROCESS_PAIRS)], 8) if s]
        assert stale == []
