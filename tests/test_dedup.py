"""Request coalescing (`dedup`) end to end: a real upstream that counts its calls, real Redis,
real clients, one or two sidecar instances."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import InProcessSidecar, Origin, SidecarProcess, free_port, make_config, until

Factory = Callable[..., Awaitable[InProcessSidecar]]
SHOP = {"Host": "shop.example"}  # instances behind one load balancer see one Host
BIG = 10 * 1024 * 1024


def dedup_config(origin: Origin, redis_url: str, *, route: dict[str, Any] | None = None,
                 **dedup: Any) -> dict[str, Any]:
    routes = [{"name": "api", "match": {"path": "/**"}, "upstream": "app", "dedup": dedup,
               **(route or {})}]
    return make_config(origin.url, redis_url, routes=routes)


class Gate:
    """Holds the upstream's answers until the test opens it."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    def replying(self, body: bytes, headers: dict[str, str] | None = None
                 ) -> Callable[[web.Request, int], Awaitable[web.StreamResponse]]:
        async def answer(request: web.Request, n: int) -> web.StreamResponse:
            await self.open.wait()
            return web.Response(body=body, headers=headers or {})

        return answer

    def echoing_accept_encoding(self) -> Callable[[web.Request, int],
                                                  Awaitable[web.StreamResponse]]:
        """Answers with the request's Accept-Encoding, varying on it."""
        async def answer(request: web.Request, n: int) -> web.StreamResponse:
            await self.open.wait()
            return web.Response(text=request.headers.get("Accept-Encoding", "none"),
                                headers={"Vary": "Accept-Encoding"})

        return answer


async def dedup_events(admin_url: str, event: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            admin_url + "/admin/stats") as response:
        stats = await response.json()
    return sum(e["count"] for e in stats["dedup"]["events"] if e["event"] == event)


async def get_all(urls: list[str], headers: dict[str, str] | None = None
                  ) -> list[tuple[int, bytes, str]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one(url: str) -> tuple[int, bytes, str]:
            async with session.get(url, headers=headers) as response:
                body = await response.read()
                return response.status, body, response.headers.get("X-Sidecar-Dedup", "")

        return await asyncio.gather(*(one(url) for url in urls))


async def test_concurrent_identical_gets_reach_the_upstream_once(sidecar_factory, origin,
                                                                 redis_url):
    gate = Gate()
    origin.script("/item", gate.replying(b"the item"))
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    requests = asyncio.ensure_future(get_all([sidecar.url + "/item"] * 200))
    await until(lambda: dedup_events_is(sidecar, "follower", 199))
    gate.open.set()
    results = await requests
    assert origin.calls["/item"] == 1
    assert all(status == 200 and body == b"the item" for status, body, _ in results)
    assert sorted(marker for _, _, marker in results).count("follower") == 199


async def dedup_events_is(sidecar: InProcessSidecar, event: str, n: int) -> bool:
    return await dedup_events(sidecar.admin_url, event) >= n


async def test_a_10_mib_body_is_fanned_out_whole_to_every_follower(sidecar_factory, origin,
                                                                   redis_url):
    gate = Gate()
    body = bytes(range(256)) * (BIG // 256)
    origin.script("/big", gate.replying(body))
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    requests = asyncio.ensure_future(get_all([sidecar.url + "/big"] * 200))
    await until(lambda: dedup_events_is(sidecar, "follower", 199))
    gate.open.set()
    results = await requests
    assert origin.calls["/big"] == 1
    digest = hashlib.sha256(body).hexdigest()
    assert {(status, hashlib.sha256(got).hexdigest()) for status, got, _ in results} == {
        (200, digest)}


async def test_two_instances_sharing_redis_send_one_upstream_request(sidecar_factory, origin,
                                                                     redis_url):
    gate = Gate()
    origin.script("/item", gate.replying(b"shared item", {"ETag": '"v1"'}))
    one = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "one.yaml")
    two = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "two.yaml")
    requests = asyncio.ensure_future(get_all(
        [one.url + "/item"] * 100 + [two.url + "/item"] * 100, headers=SHOP))
    await until(lambda: both_waiting(one, two))
    gate.open.set()
    results = await requests
    assert origin.calls["/item"] == 1
    assert {(status, body) for status, body, _ in results} == {(200, b"shared item")}
    assert [marker for _, _, marker in results].count("follower") == 199


async def both_waiting(one: InProcessSidecar, two: InProcessSidecar) -> bool:
    return (await dedup_events(one.admin_url, "follower") >= 99
            and await dedup_events(two.admin_url, "follower") >= 99
            and await dedup_events(one.admin_url, "leader")
            + await dedup_events(two.admin_url, "leader") == 2)


async def test_two_instances_share_a_10_mib_body(sidecar_factory, origin, redis_url):
    gate = Gate()
    body = b"z" * BIG
    origin.script("/big", gate.replying(body))
    one = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "one.yaml")
    two = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "two.yaml")
    requests = asyncio.ensure_future(get_all(
        [one.url + "/big"] * 100 + [two.url + "/big"] * 100, headers=SHOP))
    await until(lambda: both_waiting(one, two))
    gate.open.set()
    results = await requests
    assert origin.calls["/big"] == 1
    assert all(status == 200 and got == body for status, got, _ in results)


async def test_leader_timeout_gives_followers_a_clear_error_within_wait(sidecar_factory,
                                                                        origin, redis_url):
    async def slow(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    origin.script("/slow", slow)
    sidecar = await sidecar_factory(dedup_config(origin, redis_url, wait="3s",
                                                 route={"timeout": "0.5s"}))
    started = time.monotonic()
    results = await get_all([sidecar.url + "/slow"] * 20)
    assert time.monotonic() - started < 3
    assert {status for status, _, _ in results} == {504}
    assert origin.calls["/slow"] == 1


async def test_followers_go_to_the_upstream_themselves_after_wait(sidecar_factory, origin,
                                                                  redis_url):
    async def slow(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(1.5 if n == 1 else 0)
        return web.Response(text=f"answer {n}")

    origin.script("/slow", slow)
    sidecar = await sidecar_factory(dedup_config(origin, redis_url, wait="0.3s"))
    first = asyncio.ensure_future(get_all([sidecar.url + "/slow"]))
    await until(lambda: dedup_events_is(sidecar, "leader", 1))
    started = time.monotonic()
    (status, body, marker), = await get_all([sidecar.url + "/slow"])
    assert status == 200 and body == b"answer 2" and marker == ""
    assert time.monotonic() - started < 1.2
    assert (await first)[0][1] == b"answer 1"


async def test_a_killed_leader_instance_is_taken_over(sidecar_factory, sidecar_process, origin,
                                                      redis_url):
    async def slow(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(30 if n == 1 else 0.1)
        return web.Response(text=f"answer {n}")

    origin.script("/report", slow)
    config = dedup_config(origin, redis_url, scope="cluster", wait="10s", lease="1s")
    config["server"] = {"listen": f"127.0.0.1:{free_port()}",
                        "admin_listen": f"127.0.0.1:{free_port()}", "workers": 1}
    leader: SidecarProcess = sidecar_process(config, "leader.yaml")
    follower = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster",
                                                  wait="10s", lease="1s"), "follower.yaml")
    async with aiohttp.ClientSession() as session:
        lead = asyncio.ensure_future(session.get(leader.url + "/report", headers=SHOP))
        await until(lambda: origin_called(origin, "/report", 1))
        followers = asyncio.ensure_future(get_all([follower.url + "/report"] * 10,
                                                  headers=SHOP))
        await until(lambda: dedup_events_is(follower, "follower", 9))
        started = time.monotonic()
        leader.process.send_signal(signal.SIGKILL)
        results = await followers
        lead.cancel()
    assert time.monotonic() - started < 5
    assert {(status, body) for status, body, _ in results} == {(200, b"answer 2")}
    assert origin.calls["/report"] == 2
    assert await dedup_events(follower.admin_url, "takeover") >= 1


async def nothing_in_flight(sidecar: InProcessSidecar) -> bool:
    async with aiohttp.ClientSession() as session, session.get(
            sidecar.admin_url + "/admin/stats") as response:
        return (await response.json())["dedup"]["in_flight"] == 0


async def origin_called(origin: Origin, path: str, n: int) -> bool:
    return origin.calls[path] >= n


async def test_set_cookie_responses_are_never_shared(sidecar_factory, origin, redis_url):
    gate = Gate()
    origin.script("/login", gate.replying(b"welcome", {"Set-Cookie": "session=abc"}))
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    requests = asyncio.ensure_future(get_all([sidecar.url + "/login"] * 5))
    await until(lambda: dedup_events_is(sidecar, "follower", 4))
    gate.open.set()
    results = await requests
    assert origin.calls["/login"] == 5
    assert all(marker == "" for _, _, marker in results)


async def test_private_responses_shared_only_when_credentials_are_keyed(sidecar_factory,
                                                                        origin, redis_url):
    gate = Gate()
    origin.script("/me", gate.replying(b"my page", {"Cache-Control": "private"}))
    keyed = await sidecar_factory(dedup_config(origin, redis_url), "keyed.yaml")
    unkeyed = await sidecar_factory(dedup_config(
        origin, redis_url, key={"headers": ["Accept-Language"]}), "unkeyed.yaml")
    first = asyncio.ensure_future(get_all([keyed.url + "/me"] * 3))
    second = asyncio.ensure_future(get_all([unkeyed.url + "/me"] * 3))
    await until(lambda: dedup_events_is(keyed, "follower", 2))
    await until(lambda: dedup_events_is(unkeyed, "follower", 2))
    gate.open.set()
    assert [m for _, _, m in await first].count("follower") == 2
    assert [m for _, _, m in await second].count("follower") == 0
    assert origin.calls["/me"] == 1 + 3


async def test_different_credentials_are_different_calls(sidecar_factory, origin, redis_url):
    gate = Gate()
    origin.script("/me", gate.replying(b"page"))
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    alice = asyncio.ensure_future(get_all([sidecar.url + "/me"] * 3,
                                          headers={"Authorization": "Bearer alice"}))
    bob = asyncio.ensure_future(get_all([sidecar.url + "/me"] * 3,
                                        headers={"Authorization": "Bearer bob"}))
    await until(lambda: dedup_events_is(sidecar, "follower", 4))
    gate.open.set()
    await alice
    await bob
    assert origin.calls["/me"] == 2


async def test_a_follower_with_other_vary_values_asks_for_itself(sidecar_factory, origin,
                                                                 redis_url):
    gate = Gate()

    origin.script("/v", gate.echoing_accept_encoding())
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def get(encoding: str) -> str:
            async with session.get(sidecar.url + "/v",
                                   headers={"Accept-Encoding": encoding}) as response:
                return await response.text()

        gzip = asyncio.ensure_future(get("gzip"))
        await until(lambda: dedup_events_is(sidecar, "leader", 1))
        brotli = asyncio.ensure_future(get("br"))
        await until(lambda: dedup_events_is(sidecar, "follower", 1))
        gate.open.set()
        assert await gzip == "gzip"
        assert await brotli == "br"
    assert origin.calls["/v"] == 2


async def test_cluster_scope_with_redis_down_still_coalesces_locally(
        sidecar_factory, origin, own_redis):
    gate = Gate()
    origin.script("/item", gate.replying(b"item"))
    sidecar = await sidecar_factory(dedup_config(origin, own_redis.url, scope="cluster"))
    own_redis.kill()
    await until(lambda: redis_down(sidecar))
    requests = asyncio.ensure_future(get_all([sidecar.url + "/item"] * 20))
    await until(lambda: dedup_events_is(sidecar, "follower", 19))
    gate.open.set()
    results = await requests
    assert {(status, body) for status, body, _ in results} == {(200, b"item")}
    assert origin.calls["/item"] == 1


async def redis_down(sidecar: InProcessSidecar) -> bool:
    return not sidecar.runtime.dedup.cluster_ready


async def test_unlisted_methods_and_bodies_are_not_coalesced(sidecar_factory, origin,
                                                             redis_url):
    gate = Gate()
    origin.script("/form", gate.replying(b"ok"))
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> int:
            async with session.post(sidecar.url + "/form", data=b"x") as response:
                return response.status

        posts = [asyncio.ensure_future(post()) for _ in range(3)]
        await until(lambda: origin_called(origin, "/form", 3))
        gate.open.set()
        assert await asyncio.gather(*posts) == [200, 200, 200]
    assert await dedup_events(sidecar.admin_url, "leader") == 0


async def test_credentials_left_out_of_the_key_are_never_coalesced(sidecar_factory, origin,
                                                                   redis_url):
    gate = Gate()

    async def page(request: web.Request, n: int) -> web.Response:
        await gate.open.wait()
        return web.Response(text="page of " + request.headers.get("Authorization", "nobody"))

    origin.script("/me", page)
    sidecar = await sidecar_factory(dedup_config(origin, redis_url,
                                                 key={"headers": ["Accept-Language"]}))
    alice = asyncio.ensure_future(get_all([sidecar.url + "/me"],
                                          headers={"Authorization": "alice"}))
    bob = asyncio.ensure_future(get_all([sidecar.url + "/me"], headers={"Authorization": "bob"}))
    await until(lambda: origin_called(origin, "/me", 2))
    gate.open.set()
    assert (await alice)[0][1] == b"page of alice"
    assert (await bob)[0][1] == b"page of bob"


async def test_a_client_leaving_before_a_streamed_answer_does_not_wedge_the_key(
        sidecar_factory, origin, redis_url):
    gate = Gate()
    body = b"s" * (1024 * 1024)

    async def big(request: web.Request, n: int) -> web.Response:
        if n == 1:
            await gate.open.wait()
        return web.Response(body=body)

    origin.script("/big", big)
    sidecar = await sidecar_factory(dedup_config(origin, redis_url))
    async with aiohttp.ClientSession() as session:
        with contextlib.suppress(TimeoutError):
            async with session.get(sidecar.url + "/big",
                                   timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
    gate.open.set()
    await until(lambda: nothing_in_flight(sidecar))
    (status, got, _), = await asyncio.wait_for(get_all([sidecar.url + "/big"]), 5)
    assert status == 200 and got == body


async def test_a_new_flight_never_gets_the_previous_flights_result(sidecar_factory, origin,
                                                                   redis_url):
    gate = Gate()

    async def answer(request: web.Request, n: int) -> web.Response:
        if n == 2:
            await gate.open.wait()
        return web.Response(text=f"answer {n}", headers={"Cache-Control": "no-store"})

    origin.script("/n", answer)
    one = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "one.yaml")
    two = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "two.yaml")
    assert (await get_all([one.url + "/n"], headers=SHOP))[0][1] == b"answer 1"
    second = asyncio.ensure_future(get_all([one.url + "/n"], headers=SHOP))
    await until(lambda: origin_called(origin, "/n", 2))
    third = asyncio.ensure_future(get_all([two.url + "/n"], headers=SHOP))
    await until(lambda: dedup_events_is(two, "cluster_wait", 1))
    gate.open.set()
    assert (await second)[0][1] == b"answer 2"
    assert (await third)[0][1] == b"answer 2"
    assert origin.calls["/n"] == 2


async def test_vary_is_checked_against_the_remote_leaders_request(sidecar_factory, origin,
                                                                  redis_url):
    gate = Gate()

    origin.script("/v", gate.echoing_accept_encoding())
    one = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "one.yaml")
    two = await sidecar_factory(dedup_config(origin, redis_url, scope="cluster"), "two.yaml")
    gzip = asyncio.ensure_future(get_all([one.url + "/v"],
                                         headers={**SHOP, "Accept-Encoding": "gzip"}))
    await until(lambda: origin_called(origin, "/v", 1))
    brotli = asyncio.ensure_future(get_all([two.url + "/v"],
                                           headers={**SHOP, "Accept-Encoding": "br"}))
    await until(lambda: dedup_events_is(two, "cluster_wait", 1))
    gate.open.set()
    assert (await gzip)[0][1] == b"gzip"
    assert (await brotli)[0][1] == b"br"


async def test_with_the_cache_a_burst_of_misses_is_one_call_and_hits_skip_dedup(
        sidecar_factory, origin, redis_url):
    gate = Gate()
    origin.script("/p", gate.replying(b"product", {"Cache-Control": "max-age=60"}))
    sidecar = await sidecar_factory(dedup_config(origin, redis_url,
                                                 route={"cache": {"ttl": "60s"}}))
    burst = asyncio.ensure_future(get_all([sidecar.url + "/p"] * 50))
    await until(lambda: dedup_events_is(sidecar, "follower", 49))
    gate.open.set()
    assert {(status, body) for status, body, _ in await burst} == {(200, b"product")}
    assert origin.calls["/p"] == 1
    async with aiohttp.ClientSession() as session, session.get(sidecar.url + "/p") as hit:
        assert hit.headers["Cache-Status"].startswith("sidecar; hit")
        assert "X-Sidecar-Dedup" not in hit.headers
    assert await dedup_events(sidecar.admin_url, "leader") == 1
    stats = sidecar.runtime.cache.counts
    assert stats[("api", "memory", "store")] == 1


@pytest.mark.parametrize("size", [1024, BIG], ids=["1KiB", "10MiB"])
async def test_two_sidecar_processes_sharing_redis_send_one_upstream_request(
        sidecar_process, origin, redis_url, size):
    gate = Gate()
    body = bytes(range(256)) * (size // 256)
    origin.script("/item", gate.replying(body))
    procs = []
    for name in ("one.yaml", "two.yaml"):
        config = dedup_config(origin, redis_url, scope="cluster")
        config["server"] = {"listen": f"127.0.0.1:{free_port()}",
                            "admin_listen": f"127.0.0.1:{free_port()}", "workers": 1}
        procs.append(sidecar_process(config, name))
    one, two = procs
    requests = asyncio.ensure_future(get_all(
        [one.url + "/item"] * 100 + [two.url + "/item"] * 100, headers=SHOP))

    async def all_waiting() -> bool:
        followers = [await dedup_events(p.admin_url, "follower") for p in procs]
        leaders = [await dedup_events(p.admin_url, "leader") for p in procs]
        return followers == [99, 99] and leaders == [1, 1]

    await until(all_waiting, timeout=20)
    gate.open.set()
    results = await requests
    assert origin.calls["/item"] == 1
    digest = hashlib.sha256(body).hexdigest()
    assert {(status, hashlib.sha256(got).hexdigest()) for status, got, _ in results} == {
        (200, digest)}
    assert [marker for _, _, marker in results].count("follower") == 199


async def test_trusted_forwarded_hosts_are_different_calls(sidecar_factory, origin, redis_url):
    """Behind a trusted balancer one Host serves several public sites: each is its own answer."""
    gate = Gate()
    origin.script("/page", gate.replying(b"page"))
    config = dedup_config(origin, redis_url)
    config["server"]["trust_forwarded"] = True
    sidecar = await sidecar_factory(config)
    a = asyncio.ensure_future(get_all([sidecar.url + "/page"] * 3,
                                      headers={"X-Forwarded-Host": "a.example"}))
    b = asyncio.ensure_future(get_all([sidecar.url + "/page"] * 3,
                                      headers={"X-Forwarded-Host": "b.example"}))
    await until(lambda: dedup_events_is(sidecar, "follower", 4))
    gate.open.set()
    await a
    await b
    assert origin.calls["/page"] == 2
