"""Concurrent misses for one key make one upstream call (`cache.coalesce`), end to end: a real
upstream that counts its calls and holds its answers until the test lets them go, real Redis,
real clients, one or two sidecar instances. The rules are in docs/caching.md ("Concurrent
misses"); the decisions are tested on their own in tests/core/test_coalesce.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT, InProcessSidecar, Origin, RedisServer, free_port, make_config, until
from test_cache import SHOP, Reply, cache_config, purge, start

Script = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


def held(gate: asyncio.Event, *, calls: Callable[[int], bool] = lambda n: True,
         headers: Callable[[int], dict[str, str]] = lambda n: {"Cache-Control": "max-age=60"},
         body: Callable[[int], bytes] | None = None) -> Script:
    """An answer `#<call number>` that waits for `gate` on the calls `calls` selects."""
    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        if calls(n):
            await gate.wait()
        text = body(n) if body is not None else f"#{n}".encode()
        return web.Response(body=text, headers=headers(n))

    return answer


async def get_all(urls: list[str], headers: list[dict[str, str]] | None = None
                  ) -> list[Reply]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one(url: str, sent: dict[str, str]) -> Reply:
            async with session.get(url, headers=sent) as response:
                return Reply(response.status, response.headers,
                             (await response.read()).decode("latin-1"))

        sent = headers or [{}] * len(urls)
        return await asyncio.gather(*(one(url, h) for url, h in zip(urls, sent, strict=True)))


def counted(*sidecars: InProcessSidecar, event: str) -> int:
    return sum(n for sidecar in sidecars
               for (_, layer, result), n in sidecar.runtime.cache.counts.items()
               if layer == "-" and result == event)


def waiting(*sidecars: InProcessSidecar, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return counted(*sidecars, event="lock_wait") >= n

    return check


def calls_are(origin: Origin, path: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return origin.calls[path] >= n

    return check


def stored_and_collapsed(replies: list[Reply]) -> tuple[int, int]:
    stored = sum(r.cache_status.endswith("; stored") for r in replies)
    collapsed = sum(r.cache_status.endswith("; collapsed") for r in replies)
    return stored, collapsed


# -- in one worker ---------------------------------------------------------------------------


async def test_concurrent_cold_misses_reach_the_upstream_once(sidecar_factory, origin,
                                                              redis_url):
    gate = asyncio.Event()
    origin.script("/item", held(gate))
    sidecar = await start(sidecar_factory, origin, redis_url)
    burst = asyncio.ensure_future(get_all([sidecar.url + "/item"] * 20))
    await until(waiting(sidecar, n=19))
    gate.set()
    replies = await burst
    assert origin.calls["/item"] == 1
    assert {(r.status, r.body) for r in replies} == {(200, "#1")}
    assert stored_and_collapsed(replies) == (1, 19)
    follower = next(r for r in replies if r.cache_status.endswith("collapsed"))
    assert follower.cache_status.startswith("sidecar; fwd=uri-miss; fwd-status=200; ttl=")
    assert int(follower.headers["Age"]) >= 0 and follower.headers["Content-Length"] == "2"
    assert follower.headers["Server-Timing"].startswith("cache;desc=collapsed, total;dur=")
    assert "X-Sidecar-Dedup" not in follower.headers
    assert counted(sidecar, event="collapsed") == 19 and counted(sidecar, event="miss") == 1


async def test_the_shipped_cache_short_bundle_coalesces(sidecar_factory, origin, redis_url):
    gate = asyncio.Event()
    origin.script("/api/products/1", held(gate, headers=lambda n: {}))
    routes = [{"name": "products", "match": {"path": "/api/products/**"}, "upstream": "app",
               "use": ["cache-short"]}]
    sidecar = await sidecar_factory(make_config(
        origin.url, redis_url, include=str(ROOT / "policies" / "*.yaml"), routes=routes))
    burst = asyncio.ensure_future(get_all([sidecar.url + "/api/products/1"] * 10))
    await until(waiting(sidecar, n=9))
    gate.set()
    replies = await burst
    assert origin.calls["/api/products/1"] == 1
    assert {(r.status, r.body) for r in replies} == {(200, "#1")}


@pytest.mark.parametrize(("reason", "headers", "cache"), [
    ("private", lambda n: {"Cache-Control": "private, max-age=60"}, {}),
    ("no-store", lambda n: {"Cache-Control": "no-store"}, {}),
    ("set-cookie", lambda n: {"Cache-Control": "max-age=60", "Set-Cookie": f"session={n}"}, {}),
    ("too-large", lambda n: {"Cache-Control": "max-age=60"},
     {"memory": {"max_entry": "1KiB"}, "redis": {"max_entry": "1KiB"}}),
])
async def test_waiters_for_a_response_not_stored_each_get_their_own(
        sidecar_factory, origin, redis_url, reason, headers, cache):
    gate = asyncio.Event()
    n_requests = 10

    def body(n: int) -> bytes:
        return f"#{n}".encode() + (b"." * 64 * 1024 if reason == "too-large" else b"")

    # The first call waits for the gate, and so does every call of the second burst.
    origin.script("/me", held(gate, calls=lambda n: n == 1 or n > n_requests, headers=headers,
                              body=body))
    sidecar = await start(sidecar_factory, origin, redis_url, **cache)
    burst = asyncio.ensure_future(get_all([sidecar.url + "/me"] * n_requests))
    await until(waiting(sidecar, n=n_requests - 1))
    gate.set()
    replies = await burst
    assert origin.calls["/me"] == n_requests
    assert len({r.body for r in replies}) == n_requests  # each its own upstream answer
    for reply in replies:
        assert reply.status == 200
        assert reply.cache_status.endswith(f"detail={reason}"), reply.cache_status
        if reason == "set-cookie":  # its own session, nobody else's
            assert reply.headers["Set-Cookie"] == f"session={reply.body[1:]}"
    assert counted(sidecar, event="lock_pass") == n_requests - 1
    # The key's last response could not be stored: the next burst does not queue behind a
    # leader, every request is at the upstream at once.
    gate.clear()
    second = asyncio.ensure_future(get_all([sidecar.url + "/me"] * n_requests))
    await until(calls_are(origin, "/me", 2 * n_requests))
    gate.set()
    assert len({r.body for r in await second}) == n_requests
    assert counted(sidecar, event="lock_wait") == n_requests - 1  # the first burst's only


async def test_after_an_upstream_error_the_key_still_coalesces(sidecar_factory, origin,
                                                               redis_url):
    gate = asyncio.Event()
    failing = True

    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        await gate.wait()
        return web.Response(status=503 if failing else 200, text=f"#{n}")

    origin.script("/e", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    burst = asyncio.ensure_future(get_all([sidecar.url + "/e"] * 5))
    await until(waiting(sidecar, n=4))
    gate.set()
    assert sorted(r.status for r in await burst) == [503] * 5  # each its own
    failing = False
    gate.clear()
    burst = asyncio.ensure_future(get_all([sidecar.url + "/e"] * 5))
    await until(waiting(sidecar, n=8))  # a 503 did not make the key skip the lock
    gate.set()
    assert {(r.status, r.body) for r in await burst} == {(200, "#6")}
    assert origin.calls["/e"] == 6


async def test_a_stored_response_makes_the_key_coalesce_again(sidecar_factory, origin,
                                                              redis_url, client):
    gate = asyncio.Event()
    gate.set()
    origin.script("/flip", held(gate, calls=lambda n: n == 3, headers=lambda n: {
        "Cache-Control": "private" if n == 1 else "max-age=60"}))
    sidecar = await start(sidecar_factory, origin, redis_url)
    await get_all([sidecar.url + "/flip"])  # private: the key skips the lock
    await get_all([sidecar.url + "/flip"])  # stored: the key is forgotten
    await purge(client, sidecar, key="/flip")
    gate.clear()
    burst = asyncio.ensure_future(get_all([sidecar.url + "/flip"] * 5))
    await until(waiting(sidecar, n=4))
    gate.set()
    assert {r.body for r in await burst} == {"#3"}
    assert origin.calls["/flip"] == 3


async def test_a_waiter_fetches_itself_after_lock_timeout(sidecar_factory, origin, redis_url):
    gate = asyncio.Event()
    origin.script("/slow", held(gate, calls=lambda n: n == 1))
    sidecar = await start(sidecar_factory, origin, redis_url, lock_timeout="500ms")
    started = time.monotonic()
    leader = asyncio.ensure_future(get_all([sidecar.url + "/slow"]))
    await until(calls_are(origin, "/slow", 1))
    waiters = await get_all([sidecar.url + "/slow"] * 5)  # while the leader is held
    waited = time.monotonic() - started
    assert 0.5 <= waited < 3.0, waited
    assert not leader.done()
    assert sorted(r.body for r in waiters) == ["#2", "#3", "#4", "#5", "#6"]
    assert counted(sidecar, event="lock_timeout") == 5
    gate.set()
    assert [r.body for r in await leader] == ["#1"]


async def test_coalesce_false_sends_every_miss_upstream(sidecar_factory, origin, redis_url):
    gate = asyncio.Event()
    origin.script("/each", held(gate))
    sidecar = await start(sidecar_factory, origin, redis_url, coalesce=False)
    burst = asyncio.ensure_future(get_all([sidecar.url + "/each"] * 10))
    await until(calls_are(origin, "/each", 10))  # all at the upstream at once
    gate.set()
    assert len({r.body for r in await burst}) == 10
    assert counted(sidecar, event="lock_wait") == 0


async def test_waiters_of_another_variant_coalesce_in_a_second_round(sidecar_factory, origin,
                                                                     redis_url):
    gate = asyncio.Event()

    async def echo(request: web.Request, n: int) -> web.StreamResponse:
        await gate.wait()
        return web.Response(text=request.headers["Accept-Encoding"],
                            headers={"Vary": "Accept-Encoding", "Cache-Control": "max-age=60"})

    origin.script("/v", echo)
    sidecar = await start(sidecar_factory, origin, redis_url)
    encodings = [{"Accept-Encoding": "gzip"}, {"Accept-Encoding": "br"}] * 10
    burst = asyncio.ensure_future(get_all([sidecar.url + "/v"] * 20, encodings))
    await until(waiting(sidecar, n=19))
    gate.set()
    replies = await burst
    assert [r.body for r in replies] == [e["Accept-Encoding"] for e in encodings]
    assert origin.calls["/v"] == 2  # one per variant
    assert stored_and_collapsed(replies) == (2, 18)


async def test_a_failed_leader_lets_a_waiter_lead(sidecar_factory, origin, redis_url):
    never = asyncio.Event()
    origin.script("/f", held(never, calls=lambda n: n == 1))
    sidecar = await start(sidecar_factory, origin, redis_url, lock_timeout="10s",
                          route={"timeout": "300ms"})
    first = asyncio.ensure_future(get_all([sidecar.url + "/f"]))
    await until(calls_are(origin, "/f", 1))
    others = await get_all([sidecar.url + "/f"] * 5)  # the leader times out meanwhile
    assert [r.status for r in await first] == [504]
    assert {(r.status, r.body) for r in others} == {(200, "#2")}
    assert origin.calls["/f"] == 2
    assert stored_and_collapsed(others) == (1, 4)
    never.set()


async def test_requests_asking_for_a_fresh_answer_do_not_wait(sidecar_factory, origin,
                                                              redis_url):
    gate = asyncio.Event()
    origin.script("/n", held(gate, calls=lambda n: n == 1))
    sidecar = await start(sidecar_factory, origin, redis_url)
    leader = asyncio.ensure_future(get_all([sidecar.url + "/n"]))
    await until(calls_are(origin, "/n", 1))
    own = await get_all([sidecar.url + "/n"] * 2, [{"Cache-Control": "no-cache"},
                                                   {"Cache-Control": "max-age=0"}])
    assert sorted(r.body for r in own) == ["#2", "#3"]
    gate.set()
    await leader
    assert counted(sidecar, event="lock_wait") == 0


async def test_a_route_with_dedup_leaves_coalescing_to_it(sidecar_factory, origin, redis_url):
    gate = asyncio.Event()
    origin.script("/d", held(gate))
    sidecar = await start(sidecar_factory, origin, redis_url, route={"dedup": {}})
    burst = asyncio.ensure_future(get_all([sidecar.url + "/d"] * 10))

    async def followers() -> bool:
        return sidecar.runtime.dedup.counts[("cached", "follower")] >= 9

    await until(followers)
    gate.set()
    assert {r.body for r in await burst} == {"#1"}
    assert origin.calls["/d"] == 1
    assert counted(sidecar, event="lock_wait") == 0


# -- across instances ------------------------------------------------------------------------


async def cluster_ready(*sidecars: InProcessSidecar) -> None:
    async def ready() -> bool:
        return all(s.runtime.dedup.cluster_ready for s in sidecars)

    await until(ready)


async def test_two_instances_sharing_redis_make_one_upstream_call(sidecar_factory, origin,
                                                                  redis_url):
    gate = asyncio.Event()
    origin.script("/item", held(gate))
    one = await start(sidecar_factory, origin, redis_url, "one.yaml")
    two = await start(sidecar_factory, origin, redis_url, "two.yaml")
    await cluster_ready(one, two)
    urls = [one.url + "/item"] * 10 + [two.url + "/item"] * 10
    burst = asyncio.ensure_future(get_all(urls, [SHOP] * 20))
    await until(waiting(one, two, n=19))
    gate.set()
    replies = await burst
    assert origin.calls["/item"] == 1
    assert {(r.status, r.body) for r in replies} == {(200, "#1")}
    assert stored_and_collapsed(replies) == (1, 19)


async def test_across_instances_a_response_not_stored_is_each_ones_own(sidecar_factory, origin,
                                                                       redis_url):
    gate = asyncio.Event()
    origin.script("/me", held(gate, calls=lambda n: n == 1, headers=lambda n: {
        "Cache-Control": "max-age=60", "Set-Cookie": f"session={n}"}))
    one = await start(sidecar_factory, origin, redis_url, "one.yaml")
    two = await start(sidecar_factory, origin, redis_url, "two.yaml")
    await cluster_ready(one, two)
    urls = [one.url + "/me"] * 5 + [two.url + "/me"] * 5
    burst = asyncio.ensure_future(get_all(urls, [SHOP] * 10))
    await until(waiting(one, two, n=9))
    gate.set()
    replies = await burst
    assert origin.calls["/me"] == 10
    assert sorted(r.headers["Set-Cookie"] for r in replies) == sorted(
        f"session={r.body[1:]}" for r in replies)
    assert len({r.body for r in replies}) == 10


async def test_across_instances_the_wait_is_bounded_by_lock_timeout(sidecar_factory, origin,
                                                                    redis_url):
    gate = asyncio.Event()
    origin.script("/slow", held(gate, calls=lambda n: n == 1))
    one = await start(sidecar_factory, origin, redis_url, "one.yaml", lock_timeout="500ms")
    two = await start(sidecar_factory, origin, redis_url, "two.yaml", lock_timeout="500ms")
    await cluster_ready(one, two)
    started = time.monotonic()
    leader = asyncio.ensure_future(get_all([one.url + "/slow"], [SHOP]))
    await until(calls_are(origin, "/slow", 1))
    others = await get_all([two.url + "/slow"] * 3, [SHOP] * 3)  # the leader is still held
    assert 0.5 <= time.monotonic() - started < 3.0
    assert not leader.done()
    # Two's leader waited for one's, then fetched; its own waiters waited for it, or for as
    # long as they may.
    assert origin.calls["/slow"] in (2, 3, 4)
    assert all(r.status == 200 and r.body != "#1" for r in others)
    gate.set()
    assert [r.body for r in await leader] == ["#1"]


async def test_with_redis_down_each_worker_still_coalesces(sidecar_factory, origin,
                                                           own_redis: RedisServer):
    gate = asyncio.Event()
    origin.script("/item", held(gate))
    sidecar = await start(sidecar_factory, origin, own_redis.url)
    await cluster_ready(sidecar)
    own_redis.kill()

    async def down() -> bool:
        return not sidecar.runtime.dedup.cluster_ready

    await until(down)
    burst = asyncio.ensure_future(get_all([sidecar.url + "/item"] * 10))
    await until(waiting(sidecar, n=9))
    gate.set()
    replies = await burst
    assert origin.calls["/item"] == 1
    assert {(r.status, r.body) for r in replies} == {(200, "#1")}


async def scraped(admin_url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(
            admin_url + "/metrics") as response:
        text = await response.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
async def test_two_instances_of_two_workers_make_one_upstream_call(sidecar_process, origin,
                                                                   redis_url):
    gate = asyncio.Event()
    origin.script("/item", held(gate))
    procs = []
    for name in ("one.yaml", "two.yaml"):
        config: dict[str, Any] = cache_config(origin, redis_url, ttl="60s")
        config["server"] = {"listen": f"127.0.0.1:{free_port()}",
                            "admin_listen": f"127.0.0.1:{free_port()}", "workers": 2,
                            "watch_config": False}
        procs.append(sidecar_process(config, name))

    async def all_ready() -> bool:  # every worker reporting, and reaching Redis
        return all([await scraped(p.admin_url, "sidecar_workers") == 2
                    and await scraped(p.admin_url, "sidecar_redis_up") == 1 for p in procs])

    await until(all_ready, timeout=20)
    urls = [p.url + "/item" for p in procs] * 20
    burst = asyncio.ensure_future(get_all(urls, [SHOP] * 40))

    async def all_waiting() -> bool:
        return sum([await scraped(p.admin_url, "sidecar_cache_events_total", event="lock_wait")
                    for p in procs]) >= 39

    await until(all_waiting, timeout=20)
    gate.set()
    replies = await burst
    assert origin.calls["/item"] == 1
    assert {(r.status, r.body) for r in replies} == {(200, "#1")}
