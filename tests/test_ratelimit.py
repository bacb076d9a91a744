"""`rate_limit` end to end: a real upstream, real Redis (killed and restarted), real clients from
more than one address, one sidecar in-process or two as processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from support import InProcessSidecar, Origin, make_config, until

from sidecar.stores import ratelimit as ratelimit_store

Factory = Callable[..., Awaitable[InProcessSidecar]]
Result = tuple[int, dict[str, str], bytes]


def limited(origin: Origin, redis_url: str, *, routes: list[dict[str, Any]] | None = None,
            server: dict[str, Any] | None = None, **rate_limit: Any) -> dict[str, Any]:
    routes = routes or [{"name": "api", "match": {"path": "/**"}, "upstream": "app",
                         "rate_limit": rate_limit}]
    return make_config(origin.url, redis_url, routes=routes, server=server or {})


async def get(url: str, headers: dict[str, str] | None = None,
              source: str = "127.0.0.1") -> Result:
    """One request on a fresh connection from `source` (any 127.0.0.0/8 address works)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(
            url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def statuses(url: str, n: int, headers: dict[str, str] | None = None,
                   source: str = "127.0.0.1") -> list[int]:
    return [(await get(url, headers, source))[0] for _ in range(n)]


async def events(admin_url: str, event: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            admin_url + "/admin/stats") as response:
        stats = await response.json()
    return sum(e["count"] for e in stats["dedup"]["events"] if e["event"] == event)



async def bucket_keys(redis_url: str) -> list[bytes]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return sorted(await client.keys("sidecar:ratelimit:*"))
    finally:
        await client.aclose()


# -- over the limit -------------------------------------------------------------------------------


async def test_burst_passes_then_429_with_retry_after_ratelimit_fields_and_json(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="1/m", burst=3))
    allowed = [await get(sidecar.url + "/item") for _ in range(3)]
    assert [status for status, _, _ in allowed] == [200, 200, 200]
    assert [h["RateLimit"] for _, h, _ in allowed] == [
        "limit=3, remaining=2, reset=60", "limit=3, remaining=1, reset=120",
        "limit=3, remaining=0, reset=180"]
    assert {h["RateLimit-Policy"] for _, h, _ in allowed} == {"3;w=180"}

    status, headers, body = await get(sidecar.url + "/item", {"X-Request-ID": "req-429"})
    assert status == 429
    assert headers["Retry-After"] == "60"
    assert headers["RateLimit-Policy"] == "3;w=180"
    assert headers["RateLimit"] == "limit=3, remaining=0, reset=180"
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Request-ID"] == "req-429"
    error = json.loads(body)
    assert error["error"] == "rate_limited"
    assert error["request_id"] == "req-429"
    assert "retry in 60s" in error["detail"]
    assert origin.calls["/item"] == 3  # the refused request never reached the upstream
    assert await events(sidecar.admin_url, "rate_limited") == 1


async def test_an_upstreams_own_ratelimit_fields_are_replaced_not_doubled(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item", headers={"RateLimit": "limit=1000, remaining=999, reset=1",
                                   "RateLimit-Policy": "1000;w=1", "X-Kept": "yes"})
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="1/m", burst=3))
    async with aiohttp.ClientSession() as session, session.get(sidecar.url + "/item") as resp:
        assert resp.headers.getall("RateLimit") == ["limit=3, remaining=2, reset=60"]
        assert resp.headers.getall("RateLimit-Policy") == ["3;w=180"]
        assert resp.headers["X-Kept"] == "yes"


async def test_cache_hits_are_counted_and_carry_the_fields_once(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item", headers={"Cache-Control": "max-age=60"})
    routes = [{"name": "api", "match": {"path": "/**"}, "upstream": "app",
               "cache": {"ttl": "60s"}, "rate_limit": {"rate": "1/m", "burst": 3}}]
    sidecar = await sidecar_factory(limited(origin, redis_url, routes=routes))
    async with aiohttp.ClientSession() as session:
        seen = []
        for _ in range(4):
            async with session.get(sidecar.url + "/item") as response:
                await response.read()
                seen.append((response.status, response.headers.getall("RateLimit", []),
                             response.headers.get("Cache-Status", "")))
    assert [status for status, _, _ in seen] == [200, 200, 200, 429]
    assert "hit" in seen[2][2]  # served from the pre-serialized cache entry
    assert [fields for _, fields, _ in seen[:3]] == [
        ["limit=3, remaining=2, reset=60"], ["limit=3, remaining=1, reset=120"],
        ["limit=3, remaining=0, reset=180"]]
    assert origin.calls["/item"] == 1


async def test_tokens_come_back_at_the_configured_rate(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="10/s", burst=2))
    assert await statuses(sidecar.url + "/item", 3) == [200, 200, 429]
    status, headers, _ = await get(sidecar.url + "/item")
    assert (status, headers["Retry-After"]) == (429, "1")  # 0.1 s, in whole seconds
    await asyncio.sleep(0.12)
    assert await statuses(sidecar.url + "/item", 2) == [200, 429]
    await asyncio.sleep(0.25)
    assert await statuses(sidecar.url + "/item", 3) == [200, 200, 429]  # refilled to burst


# -- keys -----------------------------------------------------------------------------------------


async def test_client_ip_buckets_are_per_tcp_peer_and_ignore_forwarded_for(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="1/h", burst=1))
    url = sidecar.url + "/item"
    assert await statuses(url, 2) == [200, 429]
    assert await statuses(url, 2, source="127.0.0.2") == [200, 429]
    # Not trusted: a forged X-Forwarded-For does not buy a fresh bucket.
    assert await statuses(url, 1, {"X-Forwarded-For": "203.0.113.9"}) == [429]


async def test_trusted_forwarded_for_keys_on_its_first_address(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="1/h", burst=1,
                                            server={"trust_forwarded": True}))
    url = sidecar.url + "/item"
    first = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
    assert await statuses(url, 2, first) == [200, 429]
    assert await statuses(url, 1, {"X-Forwarded-For": "203.0.113.9, 10.0.0.2"}) == [429]
    assert await statuses(url, 1, {"X-Forwarded-For": "198.51.100.4"}) == [200]
    assert await statuses(url, 2) == [200, 429]  # no header: the peer's own bucket


async def test_header_keys_are_per_value_and_fall_back_to_the_client_ip(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="1/h", burst=1,
                                            key="header:X-Api-Key"))
    url = sidecar.url + "/item"
    assert await statuses(url, 2, {"X-Api-Key": "alpha"}) == [200, 429]
    assert await statuses(url, 1, {"X-Api-Key": "alpha"}, source="127.0.0.2") == [429]
    assert await statuses(url, 2, {"X-Api-Key": "beta"}) == [200, 429]
    # No key: the caller's address is the key, one bucket per address.
    assert await statuses(url, 2) == [200, 429]
    assert await statuses(url, 1, source="127.0.0.2") == [200]
    assert await statuses(url, 1, {"X-Api-Key": ""}, source="127.0.0.2") == [429]


async def test_route_key_is_one_bucket_for_everyone_per_route(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/a/item")
    origin.reply("/b/item")
    limit = {"rate": "1/h", "burst": 2, "key": "route"}
    routes = [{"name": "a", "match": {"path": "/a/**"}, "upstream": "app", "rate_limit": limit},
              {"name": "b", "match": {"path": "/b/**"}, "upstream": "app", "rate_limit": limit}]
    sidecar = await sidecar_factory(limited(origin, redis_url, routes=routes))
    assert await statuses(sidecar.url + "/a/item", 1) == [200]
    assert await statuses(sidecar.url + "/a/item", 1, {"X-Api-Key": "x"}, "127.0.0.2") == [200]
    assert await statuses(sidecar.url + "/a/item", 1, source="127.0.0.3") == [429]
    assert await statuses(sidecar.url + "/b/item", 3) == [200, 200, 429]


# -- scopes and Redis -----------------------------------------------------------------------------


async def test_local_scope_never_touches_redis(
        sidecar_factory: Factory, origin: Origin, own_redis: Any) -> None:
    redis_url = own_redis.url  # its own: command counts start at zero
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="1/h", burst=2,
                                            scope="local"))
    assert await statuses(sidecar.url + "/item", 3) == [200, 200, 429]
    assert await bucket_keys(redis_url) == []
    client = aioredis.Redis.from_url(redis_url)
    try:
        # The bucket script never ran (other services, the cache's quota, run scripts of
        # their own on this Redis).
        take = hashlib.sha1(ratelimit_store._TAKE.encode()).hexdigest()
        assert await client.script_exists(take) == [False]
    finally:
        await client.aclose()
    assert await events(sidecar.admin_url, "rate_limit_local_fallback") == 0


async def test_cluster_buckets_keep_no_api_key_in_redis_and_expire_when_full(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, redis_url, rate="10/s", burst=2,
                                            key="header:X-Api-Key", scope="cluster"))
    assert await statuses(sidecar.url + "/item", 3, {"X-Api-Key": "s3cret"}) == [200, 200, 429]
    keys = await bucket_keys(redis_url)
    assert len(keys) == 1 and keys[0].startswith(b"sidecar:ratelimit:api:h:")
    assert b"s3cret" not in keys[0]
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert 0 < await client.pttl(keys[0]) <= 200  # the time to refill two tokens
    finally:
        await client.aclose()
    await asyncio.sleep(0.3)
    assert await bucket_keys(redis_url) == []
    assert await events(sidecar.admin_url, "rate_limit_local_fallback") == 0


async def test_cluster_scope_holds_across_two_processes(
        sidecar_process: Callable[..., Any], origin: Origin, redis_url: str) -> None:
    origin.reply("/item")
    config = {"rate": "1/h", "burst": 10, "scope": "cluster"}
    first = sidecar_process(limited(origin, redis_url, server={"workers": 1}, **config),
                            name="one.yaml")
    second = sidecar_process(limited(origin, redis_url, server={"workers": 1}, **config),
                             name="two.yaml")
    results: list[Result] = []
    for i in range(30):
        results.append(await get((first if i % 2 else second).url + "/item"))
    allowed = [headers for status, headers, _ in results if status == 200]
    assert len(allowed) == 10  # the burst, not twice it
    assert {status for status, _, _ in results} == {200, 429}
    assert sorted(h["RateLimit"].split(", ")[1] for h in allowed) == sorted(
        f"remaining={n}" for n in range(10))
    assert origin.calls["/item"] == 10
    assert await events(first.admin_url, "rate_limited") + await events(
        second.admin_url, "rate_limited") == 20


async def test_redis_killed_requests_keep_flowing_then_cluster_limits_resume(
        sidecar_factory: Factory, origin: Origin, own_redis: Any) -> None:
    origin.reply("/item")
    sidecar = await sidecar_factory(limited(origin, own_redis.url, rate="1/h", burst=5,
                                            scope="cluster"))
    url = sidecar.url + "/item"
    assert await statuses(url, 3) == [200] * 3
    assert await bucket_keys(own_redis.url) != []

    own_redis.kill()
    started = time.monotonic()
    during = await statuses(url, 8)
    assert during == [200] * 5 + [429] * 3  # a fresh local bucket, still enforced
    assert time.monotonic() - started < 5
    assert await events(sidecar.admin_url, "rate_limit_local_fallback") == 8
    await until(lambda: not sidecar.runtime.dedup.redis_up)
    assert await statuses(url, 1) == [429]

    own_redis.start()  # an empty Redis: the cluster bucket starts full
    await until(lambda: sidecar.runtime.dedup.redis_up)
    after = await statuses(url, 7)
    assert after == [200] * 5 + [429] * 2  # the local bucket is empty: these came from Redis
    assert await bucket_keys(own_redis.url) != []
    assert await events(sidecar.admin_url, "rate_limit_local_fallback") == 9


async def test_redis_killed_under_concurrent_load_fails_no_request(
        sidecar_factory: Factory, origin: Origin, own_redis: Any) -> None:
    origin.reply("/item")
    # A limit no load here reaches (8 clients in a loop made more than 1,000 requests a second
    # on a fast machine): what is tested is that no request fails while Redis is away.
    sidecar = await sidecar_factory(limited(origin, own_redis.url, rate="100000/s",
                                            burst=1000000, scope="cluster"))
    seen: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.get(sidecar.url + "/item") as response:
                    await response.read()
                    seen.append(response.status)

    workers = [asyncio.ensure_future(load()) for _ in range(8)]
    await until(lambda: len(seen) > 50)
    own_redis.kill()
    await until(lambda: not sidecar.runtime.dedup.redis_up)
    mark = len(seen)
    await until(lambda: len(seen) > mark + 50)
    own_redis.start()
    await until(lambda: sidecar.runtime.dedup.redis_up)
    mark = len(seen)
    await until(lambda: len(seen) > mark + 50)
    fell_back = await events(sidecar.admin_url, "rate_limit_local_fallback")
    mark = len(seen)
    await until(lambda: len(seen) > mark + 50)
    stop.set()
    await asyncio.gather(*workers)
    assert set(seen) == {200}
    assert fell_back > 0
    # Redis back: the limits are shared through it again, no request falls back any more.
    assert await events(sidecar.admin_url, "rate_limit_local_fallback") == fell_back
