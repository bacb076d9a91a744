"""Circuit breakers end to end: a real flaky upstream, real Redis, real clients and processes."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
from aiohttp import web
from support import InProcessSidecar, Origin, free_port, make_config, until

from sidecar.core.breaker import State
from sidecar.stores.breakers import BreakerService

SHOP = {"Host": "shop.example"}


def breaker_config(origin: Origin, redis_url: str, *, route: dict[str, Any] | None = None,
                   **breaker: Any) -> dict[str, Any]:
    breaker.setdefault("failures", 3)
    breaker.setdefault("reset", "30s")
    routes = [{"name": "api", "match": {"path": "/**"}, "upstream": "app", "breaker": breaker,
               **(route or {})}]
    return make_config(origin.url, redis_url, routes=routes)


class Flaky:
    """An upstream that fails while `failing` is set."""

    def __init__(self, status: int = 503) -> None:
        self.failing = True
        self.status = status

    async def __call__(self, request: web.Request, n: int) -> web.Response:
        if self.failing:
            return web.Response(status=self.status, text="down")
        return web.Response(text=f"ok #{n}", headers={"Cache-Control": "max-age=1"})


async def get(client: aiohttp.ClientSession, url: str,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    async with client.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.text()


async def breaker_state(admin_url: str, name: str = "route:api") -> str:
    async with aiohttp.ClientSession() as session, session.get(
            admin_url + "/admin/breakers") as response:
        body = await response.json()
    states = {b["name"]: b["state"] for b in body["breakers"]}
    return states.get(name, "missing")



def move_clock(sidecar: Any, seconds: float) -> None:
    """Moves the sidecar's breaker clock forward: a reset elapses without sleeping."""
    service = sidecar.runtime.breakers
    before = service.clock
    service.clock = lambda: before() + seconds

async def test_opens_after_failures_and_answers_fast_without_the_upstream(
        sidecar_factory, origin, redis_url, client):
    origin.script("/x", Flaky())
    sidecar = await sidecar_factory(breaker_config(origin, redis_url))
    for _ in range(3):
        assert (await get(client, sidecar.url + "/x"))[0] == 503
    assert origin.calls["/x"] == 3
    times = []
    for _ in range(20):
        started = time.perf_counter()
        status, headers, body = await get(client, sidecar.url + "/x")
        times.append(time.perf_counter() - started)
        assert status == 503
        assert '"error":"breaker_open"' in body and "'app'" in body
        assert 1 <= int(headers["Retry-After"]) <= 30
    assert origin.calls["/x"] == 3
    assert statistics.median(times) < 0.005
    assert await breaker_state(sidecar.admin_url) == "open"


async def test_half_opens_after_reset_and_a_good_trial_closes_it(sidecar_factory, origin,
                                                                 redis_url, client):
    flaky = Flaky()
    origin.script("/x", flaky)
    sidecar = await sidecar_factory(breaker_config(origin, redis_url, failures=2, reset="0.5s"))
    for _ in range(2):
        await get(client, sidecar.url + "/x")
    assert (await get(client, sidecar.url + "/x"))[0] == 503
    assert origin.calls["/x"] == 2
    move_clock(sidecar, 0.6)  # past `reset`: half-open
    assert (await get(client, sidecar.url + "/x"))[0] == 503  # the trial fails: open again
    assert origin.calls["/x"] == 3
    assert await breaker_state(sidecar.admin_url) == "open"
    flaky.failing = False
    move_clock(sidecar, 0.6)
    status, _, body = await get(client, sidecar.url + "/x")
    assert (status, body) == (200, "ok #4")
    assert await breaker_state(sidecar.admin_url) == "closed"


async def test_half_open_lets_a_limited_number_of_trials_through(sidecar_factory, origin,
                                                                 redis_url):
    gate = asyncio.Event()
    flaky = Flaky()

    async def slow_when_healthy(request: web.Request, n: int) -> web.Response:
        if not flaky.failing:
            await gate.wait()
        return await flaky(request, n)

    origin.script("/x", slow_when_healthy)
    sidecar = await sidecar_factory(breaker_config(origin, redis_url, failures=1, reset="0.3s"))
    async with aiohttp.ClientSession() as session:
        await get(session, sidecar.url + "/x")
        flaky.failing = False
        move_clock(sidecar, 0.4)
        requests = [asyncio.ensure_future(get(session, sidecar.url + "/x")) for _ in range(10)]
        await until(lambda: origin.calls["/x"] == 2)
        counts = sidecar.runtime.breakers.counts
        # The nine others are refused while the trial is held at the upstream.
        await until(lambda: (sum(
            n for (_, event), n in counts.items() if event == "rejected") == 9))
        gate.set()
        statuses = sorted(r[0] for r in await asyncio.gather(*requests))
    assert statuses == [200] + [503] * 9
    assert origin.calls["/x"] == 2


async def test_excluded_statuses_and_unlisted_outcomes_do_not_count(sidecar_factory, origin,
                                                                    redis_url, client):
    origin.script("/nope", Flaky(status=501))
    origin.script("/busy", Flaky(status=503))
    sidecar = await sidecar_factory(breaker_config(origin, redis_url, failures=2,
                                                   failure_on=["timeout"]))
    for _ in range(5):
        assert (await get(client, sidecar.url + "/nope"))[0] == 501
        assert (await get(client, sidecar.url + "/busy"))[0] == 503
    assert origin.calls["/busy"] == 5
    assert await breaker_state(sidecar.admin_url) == "closed"


async def test_timeouts_and_refused_connections_count(sidecar_factory, origin, redis_url,
                                                      client):
    async def hang(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    origin.script("/hang", hang)
    sidecar = await sidecar_factory(breaker_config(origin, redis_url, failures=2,
                                                   route={"timeout": "0.2s"}))
    for _ in range(2):
        assert (await get(client, sidecar.url + "/hang"))[0] == 504
    assert (await get(client, sidecar.url + "/hang"))[0] == 503
    closed = make_config(f"http://127.0.0.1:{free_port()}", redis_url, routes=[
        {"name": "api", "match": {"path": "/**"}, "upstream": "app",
         "breaker": {"failures": 2}}])
    dead = await sidecar_factory(closed, "dead.yaml")
    for _ in range(2):
        assert (await get(client, dead.url + "/"))[0] == 502
    status, _, body = await get(client, dead.url + "/")
    assert status == 503 and "breaker_open" in body


async def test_an_upstream_breaker_is_shared_by_its_routes(sidecar_factory, origin, redis_url,
                                                           client):
    origin.script("/a", Flaky())
    origin.script("/b", Flaky())
    config = make_config(origin.url, redis_url, routes=[
        {"name": "a", "match": {"path": "/a"}, "upstream": "app"},
        {"name": "b", "match": {"path": "/b"}, "upstream": "app"}])
    config["upstreams"]["app"]["breaker"] = {"failures": 2}
    sidecar = await sidecar_factory(config)
    for _ in range(2):
        await get(client, sidecar.url + "/a")
    status, _, body = await get(client, sidecar.url + "/b")
    assert status == 503 and "breaker_open" in body
    assert origin.calls["/b"] == 0
    assert await breaker_state(sidecar.admin_url, "upstream:app") == "open"


async def test_admin_reset_closes_a_breaker(sidecar_factory, origin, redis_url, client):
    flaky = Flaky()
    origin.script("/x", flaky)
    sidecar = await sidecar_factory(breaker_config(origin, redis_url, failures=1))
    await get(client, sidecar.url + "/x")
    assert await breaker_state(sidecar.admin_url) == "open"
    flaky.failing = False
    async with client.post(sidecar.admin_url + "/admin/breakers/route:api/reset") as response:
        assert response.status == 200
    assert (await get(client, sidecar.url + "/x"))[0] == 200
    async with client.post(sidecar.admin_url + "/admin/breakers/nope/reset") as response:
        assert response.status == 404
        assert "route:api" in (await response.json())["detail"]


async def test_stale_fallback_serves_the_cached_body_while_open(sidecar_factory, origin,
                                                                redis_url, client):
    flaky = Flaky()
    flaky.failing = False
    origin.script("/p", flaky)
    sidecar = await sidecar_factory(breaker_config(
        origin, redis_url, failures=1, fallback="stale", route={"cache": {"ttl": "1s"}}))
    status, _, body = await get(client, sidecar.url + "/p")
    assert (status, body) == (200, "ok #1")
    flaky.failing = True
    cache = sidecar.runtime.cache
    before = cache.clock
    cache.clock = lambda: before() + 1.1  # the entry is stale now
    status, headers, body = await get(client, sidecar.url + "/p")  # trips the breaker
    assert await breaker_state(sidecar.admin_url) == "open"
    status, headers, body = await get(client, sidecar.url + "/p")
    assert (status, body) == (200, "ok #1")
    assert headers["Cache-Status"] == "sidecar; fwd=stale; detail=breaker-open"
    assert origin.calls["/p"] == 2


async def test_a_breaker_opened_by_one_process_is_open_in_the_other(sidecar_process, origin,
                                                                    redis_url, client):
    origin.script("/x", Flaky())
    procs = []
    for name in ("one.yaml", "two.yaml"):
        config = breaker_config(origin, redis_url, failures=2, scope="cluster")
        config["server"] = {"listen": f"127.0.0.1:{free_port()}",
                            "admin_listen": f"127.0.0.1:{free_port()}", "workers": 1}
        procs.append(sidecar_process(config, name))
    one, two = procs
    for _ in range(2):
        await get(client, one.url + "/x", SHOP)
    assert await breaker_state(one.admin_url) == "open"
    started = time.monotonic()
    await until(lambda: breaker_state_is(two.admin_url, "open"), timeout=2)
    assert time.monotonic() - started < 1
    status, _, body = await get(client, two.url + "/x", SHOP)
    assert status == 503 and "breaker_open" in body
    assert origin.calls["/x"] == 2
    async with client.post(two.admin_url + "/admin/breakers/route:api/reset") as response:
        assert response.status == 200
    await until(lambda: breaker_state_is(one.admin_url, "closed"), timeout=2)


async def breaker_state_is(admin_url: str, state: str) -> bool:
    return await breaker_state(admin_url) == state


async def test_cluster_breakers_keep_working_with_redis_down(sidecar_factory, origin, own_redis,
                                                             client):
    origin.script("/x", Flaky())
    sidecar: InProcessSidecar = await sidecar_factory(
        breaker_config(origin, own_redis.url, failures=2, scope="cluster"))
    own_redis.kill()
    await until(lambda: not sidecar.runtime.redis_up, timeout=5)
    for _ in range(2):
        assert (await get(client, sidecar.url + "/x"))[0] == 503
    status, _, body = await get(client, sidecar.url + "/x")
    assert status == 503 and "breaker_open" in body
    assert origin.calls["/x"] == 2


async def test_cluster_news_applies_last_writer_wins() -> None:
    service = BreakerService()
    b = service.breaker("route:x", failures=1, reset=1, half_open_trials=1, cluster=True)
    b.failure(100)  # opened here
    assert b.allow(101.5)  # half-open trial
    b.failure(102)  # the trial failed: open again, later than another worker's good trial
    service._apply("route:x", "closed", 101.8)
    assert b.state is State.OPEN
    service._apply("route:x", "closed", 103)
    assert b.state is State.CLOSED
    service._apply("route:x", "open", 102.5)  # older than the close
    assert b.state is State.CLOSED
    await service.close()
