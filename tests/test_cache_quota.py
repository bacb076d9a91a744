"""L2's quota end to end (docs/caching.md, "How much L2 holds"): a real upstream, a real
redis-server, the sidecar in-process, and for the embedded Redis a real `sidecar run`.

Sizes are small (a 1MiB quota, 8KiB bodies) so that ten times the quota is a few seconds of
requests; the accounting is the same at 256MiB."""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from support import (
    InProcessSidecar,
    Origin,
    SidecarProcess,
    gather_limited,
    make_config,
    until,
    write_config,
)

from sidecar.config import load_config
from sidecar.process.embedded_redis import budget_for

Factory = Callable[..., Awaitable[InProcessSidecar]]
MiB = 1024**2
BODY = 8 * 1024
CACHE = "sidecar:cache:"


def serve_items(origin: Origin, count: int = 3000) -> None:
    """/item/<n>: a distinct cacheable body of BODY bytes each, tagged by n's parity."""

    async def item(request: web.Request, calls: int) -> web.Response:
        n = int(request.path.rsplit("/", 1)[1])
        return web.Response(body=request.path.encode().ljust(BODY, b"."), headers={
            "Cache-Control": "max-age=600", "Surrogate-Key": f"items parity-{n % 2}"})

    for n in range(count):
        origin.script(f"/item/{n}", item)


def quota_config(origin: Origin, redis_url: str, *, quota: str = "1MiB",
                 layers: list[str] | None = None, **sections: Any) -> dict[str, Any]:
    routes = [
        {"name": "items", "match": {"path": "/item/**"}, "upstream": "app",
         "cache": {"ttl": "10m", "layers": layers or ["redis"],
                   "redis": {"max_entry": "64KiB"}}},
        {"name": "orders", "match": {"path": "/orders/**"}, "upstream": "app",
         "idempotency": {}},
        {"name": "reports", "match": {"path": "/reports/**"}, "upstream": "app",
         "offload": {"queue": "reports", "max_body": "64KiB"}},
    ]
    return make_config(origin.url, redis_url, routes=routes,
                       cache={"redis": {"max_bytes": quota}},
                       queues={"reports": {"concurrency": 1, "max_queued": 5}, "default": {}},
                       jobs={"workers": False}, **sections)


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url) as response:
        await response.read()
        return response.status, response.headers.get("Cache-Status", "")


async def write_items(client: aiohttp.ClientSession, base: str, numbers: range) -> None:
    answers = await gather_limited([get(client, f"{base}/item/{n}") for n in numbers], 8)
    assert all(status == 200 for status, _ in answers)


async def settled(redis: aioredis.Redis, written: int) -> None:
    """Every store has run: each entry written is in L2 or was evicted."""
    async def done() -> bool:
        held = await redis.zcard(CACHE + "lru")
        evicted = int(await redis.get(CACHE + "evictions") or 0)
        return bool(held + evicted == written)
    await until(done, timeout=30)


async def cache_usage(redis: aioredis.Redis) -> int:
    """What the cache's keys take, as Redis counts it."""
    total = 0
    async for key in redis.scan_iter(CACHE + "*", count=1000):
        total += await redis.memory_usage(key, samples=0) or 0
    return total


async def held(redis: aioredis.Redis, n: int) -> bool:
    """Whether L2 still indexes /item/<n>."""
    low = f"/item/{n}\0"
    return bool(await redis.zrangebylex(CACHE + "uris", "[" + low, "[" + low + "\xff"))


async def used_memory(redis: aioredis.Redis) -> int:
    """INFO used_memory less the clients' buffers (about 20KiB a connection: the puts run
    side by side, and the pool opens connections as they do, which is no part of the cache)."""
    memory = await redis.info("memory")
    return int(memory["used_memory"]) - int(memory["mem_clients_normal"])


async def metric(client: aiohttp.ClientSession, sidecar: InProcessSidecar | SidecarProcess,
                 name: str) -> float:
    async with client.get(sidecar.admin_url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exported:\n{text}")


# -- the quota ----------------------------------------------------------------------------------


async def test_ten_times_the_quota_stays_within_it_and_other_keys_survive(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    serve_items(origin)
    origin.reply("/orders/1", status=201)
    origin.reply("/reports/1")
    sidecar = await sidecar_factory(quota_config(origin, redis_url))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with client.post(sidecar.url + "/orders/1", data=b"{}",
                               headers={"Idempotency-Key": "order-1"}) as response:
            assert response.status == 201
        async with client.post(sidecar.url + "/reports/1", data=b"r" * 60_000) as response:
            assert response.status == 202
            job = (await response.json())["status_url"]
        others = {key async for key in redis.scan_iter("*")
                  if not key.startswith(CACHE.encode())}
        assert any(k.startswith(b"sidecar:idem:") for k in others)
        assert any(b"saq:job:" in k for k in others) and any(b"body:" in k for k in others)
        # One entry first, so that the scripts are loaded and the indexes exist in the baseline.
        await write_items(client, sidecar.url, range(1))
        await settled(redis, 1)
        baseline = await used_memory(redis) - await cache_usage(redis)

        written = 10 * MiB // BODY
        await write_items(client, sidecar.url, range(1, written))
        await settled(redis, written)

        counted = int(await redis.get(CACHE + "bytes"))
        assert 0.8 * MiB < counted <= MiB
        assert await cache_usage(redis) <= 1.1 * MiB
        assert await used_memory(redis) - baseline <= 1.1 * MiB
        evictions = int(await redis.get(CACHE + "evictions"))
        assert evictions > 0.85 * written
        for key in others:
            assert await redis.exists(key), key  # nothing but the cache's keys was evicted
        async with client.get(sidecar.url + job) as response:
            assert response.status == 200 and (await response.json())["status"] == "queued"
        async with client.post(sidecar.url + "/orders/1", data=b"{}",
                               headers={"Idempotency-Key": "order-1"}) as response:
            assert response.status == 201
            assert response.headers["X-Sidecar-Dedup"] == "replay"

        async with client.get(sidecar.admin_url + "/admin/stats") as response:
            l2 = (await response.json())["cache"]["redis"]
        assert l2["quota"] == MiB and l2["bytes"] == counted and l2["evictions"] == evictions
        assert await metric(client, sidecar, "sidecar_cache_l2_bytes") == counted
        assert await metric(client, sidecar, "sidecar_cache_l2_quota_bytes") == MiB
        assert await metric(client, sidecar, "sidecar_cache_l2_evictions_total") == evictions
    finally:
        await redis.aclose()


async def test_the_least_recently_used_entry_goes_first(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    """/item/0 is read (from L1: that counts as a use of L2's copy) while three quotas' worth
    of others are written; /item/1, written with it and never read again, goes."""
    serve_items(origin)
    sidecar = await sidecar_factory(quota_config(origin, redis_url,
                                                 layers=["memory", "redis"]))
    cache = sidecar.runtime.cache
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await write_items(client, sidecar.url, range(2))
        await settled(redis, 2)
        batch = MiB // BODY // 4
        for start in range(2, 2 + 12 * batch, batch):
            status, cache_status = await get(client, sidecar.url + "/item/0")
            assert status == 200 and cache_status.startswith("sidecar; hit")
            await cache.flush_recency()
            await write_items(client, sidecar.url, range(start, start + batch))
            await settled(redis, start + batch)
        assert int(await redis.get(CACHE + "evictions")) > 0
        assert await held(redis, 0)
        assert not await held(redis, 1)
        assert not cache.touched  # flushed
    finally:
        await redis.aclose()


async def test_a_purge_and_an_expiry_give_their_bytes_back(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    serve_items(origin)
    sidecar = await sidecar_factory(quota_config(origin, redis_url))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await write_items(client, sidecar.url, range(1, 21))
        await settled(redis, 20)
        before = int(await redis.get(CACHE + "bytes"))
        async with client.post(sidecar.admin_url + "/admin/cache/purge",
                               json={"tag": "parity-1"}) as response:
            assert (await response.json())["redis_removed"] == 10  # the odd ones
        after_tag = int(await redis.get(CACHE + "bytes"))
        assert 0.4 * before < after_tag < 0.6 * before
        async with client.post(sidecar.admin_url + "/admin/cache/purge",
                               json={"prefix": "/item/1"}) as response:
            assert (await response.json())["redis_removed"] == 5  # 10, 12 ... 18
        assert 0.2 * before < int(await redis.get(CACHE + "bytes")) < 0.3 * before
        # The rest expire in Redis: their index members and charges go at the next prune.
        await redis.delete(*[key async for key in redis.scan_iter(CACHE + "e:*")])
        await redis.zadd(CACHE + "uris:exp", {m: 1 for m in await redis.zrange(
            CACHE + "uris:exp", 0, -1)}, xx=True)
        store = sidecar.runtime.cache.store
        assert store is not None
        await store.prune(time.time())
        assert int(await redis.get(CACHE + "bytes")) == 0
        for index in ("lru", "meta", "uris", "uris:exp"):
            assert not await redis.exists(CACHE + index), index
        assert not [key async for key in redis.scan_iter(CACHE + "tag:*")]
        assert int(await redis.get(CACHE + "evictions") or 0) == 0  # purges are not evictions
    finally:
        await redis.aclose()


async def test_a_reload_that_lowers_the_quota_evicts_at_once(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    serve_items(origin)
    config = quota_config(origin, redis_url, quota="3MiB")
    sidecar = await sidecar_factory(config)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        written = 2 * MiB // BODY
        await write_items(client, sidecar.url, range(written))
        await settled(redis, written)
        assert int(await redis.get(CACHE + "bytes")) > 1.5 * MiB
        config["cache"] = {"redis": {"max_bytes": "1MiB"}}
        write_config(sidecar.config_path, config)
        assert await sidecar.runtime.reload("test")

        async def within() -> bool:
            return int(await redis.get(CACHE + "bytes")) <= MiB
        await until(within)
        assert await metric(client, sidecar, "sidecar_cache_l2_quota_bytes") == MiB
    finally:
        await redis.aclose()


# -- the embedded Redis -------------------------------------------------------------------------


def embedded_config(origin: Origin, state_dir: Path) -> dict[str, Any]:
    """The smallest budget there is: 1MiB of cache, 8MiB of headroom, five jobs waiting and one
    running with heads bounded small, so that an unbounded cache would fill Redis."""
    config = quota_config(origin, "embedded", server={
        "state_dir": str(state_dir), "limits": {"max_headers": 20, "max_header_size": "2KiB"}})
    config["redis"]["headroom"] = "8MiB"
    return config


async def test_the_embedded_redis_is_bounded_and_a_full_cache_leaves_the_jobs_room(
        sidecar_process: Callable[..., SidecarProcess], origin: Origin, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    serve_items(origin)
    origin.reply("/reports/1")
    state = tmp_path / "state"
    sidecar = sidecar_process(embedded_config(origin, state))
    budget = budget_for(load_config(sidecar.config_path).config)
    assert budget.jobs > 0 and budget.total < 12 * MiB
    redis = aioredis.Redis.from_url(f"unix://{state / 'redis' / 'redis.sock'}")
    try:
        assert await redis.config_get("maxmemory") == {"maxmemory": str(budget.total)}
        assert await redis.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        # More cache than the whole of maxmemory: only the quota stays.
        written = 12 * MiB // BODY
        await write_items(client, sidecar.url, range(written))
        await settled(redis, written)
        assert int(await redis.get(CACHE + "bytes")) <= MiB
        # Every job max_queued allows is taken, with the largest body offload allows.
        jobs = []
        for _ in range(5):
            async with client.post(sidecar.url + "/reports/1",
                                   data=b"r" * (64 * 1024)) as response:
                assert response.status == 202, await response.text()
                jobs.append((await response.json())["status_url"])
        async with client.post(sidecar.url + "/reports/1", data=b"r") as response:
            assert response.status == 503
            assert (await response.json())["error"] == "job_queue_full"
    finally:
        await redis.aclose()

    # A restart reloads the append-only file: the jobs, and no more cache than the quota.
    assert sidecar.stop() == 0
    sidecar = sidecar_process(sidecar.config, "config-again.yaml")
    redis = aioredis.Redis.from_url(f"unix://{state / 'redis' / 'redis.sock'}")
    try:
        assert int(await redis.get(CACHE + "bytes")) <= MiB
        assert await redis.zcard(CACHE + "lru") > 0  # still warm
        for url in jobs:
            async with client.get(sidecar.url + url) as response:
                assert (await response.json())["status"] == "queued"
        assert await metric(client, sidecar, "sidecar_cache_l2_evictions_total") > 0
        # A reload moves maxmemory with the budget.
        config = {**sidecar.config, "cache": {"redis": {"max_bytes": "2MiB"}}}
        write_config(sidecar.config_path, config)
        sidecar.signal(signal.SIGHUP)
        grown = budget_for(load_config(sidecar.config_path).config).total
        assert grown == budget.total + MiB

        async def moved() -> bool:
            return bool(await redis.config_get("maxmemory") == {"maxmemory": str(grown)})
        await until(moved)
    finally:
        await redis.aclose()
