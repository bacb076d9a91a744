"""The cache policy end to end: a real upstream scripted per test, real Redis, a real client.
One test per rule of docs/caching.md (ranges: test_cache_ranges.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDictProxy
from support import InProcessSidecar, Origin, RedisServer, make_config, until

from sidecar.stores.entry import CachedResponse

Factory = Callable[..., Awaitable[InProcessSidecar]]
SHOP = {"Host": "shop.example"}  # instances behind one load balancer see one Host


class Reply:
    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def cache_status(self) -> str:
        return self.headers.get("Cache-Status", "")

    @property
    def hit(self) -> bool:
        return self.cache_status.startswith("sidecar; hit")


async def fetch(client: aiohttp.ClientSession, url: str, method: str = "GET",
                **kwargs: Any) -> Reply:
    async with client.request(method, url, **kwargs) as response:
        return Reply(response.status, response.headers, await response.text())


def cache_config(origin: Origin, redis_url: str, *, route: dict[str, Any] | None = None,
                 **cache: Any) -> dict[str, Any]:
    cache.setdefault("ttl", "60s")
    routes = [{"name": "cached", "match": {"path": "/**"}, "upstream": "app", "cache": cache,
               **(route or {})}]
    return make_config(origin.url, redis_url, routes=routes)


async def start(factory: Factory, origin: Origin, redis_url: str, name: str = "config.yaml",
                **kwargs: Any) -> InProcessSidecar:
    return await factory(cache_config(origin, redis_url, **kwargs), name)


async def l2_entries(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return len(await client.keys("sidecar:cache:e:*"))
    finally:
        await client.aclose()


async def stats(client: aiohttp.ClientSession, sidecar: InProcessSidecar) -> dict[str, Any]:
    async with client.get(sidecar.admin_url + "/admin/stats") as response:
        return (await response.json())["cache"]  # type: ignore[no-any-return]


def counted(stats_body: dict[str, Any], layer: str, result: str) -> int:
    return sum(row["count"] for row in stats_body["requests"]
               if row["layer"] == layer and row["result"] == result)


def move_clock(sidecar: InProcessSidecar, seconds: float) -> None:
    """Moves the sidecar's cache clock forward, so that a test sees expiries without sleeping."""
    service = sidecar.runtime.cache
    before = service.clock
    service.clock = lambda: before() + seconds


def sidecar_date(sidecar: InProcessSidecar) -> str:
    """A `Date` on the sidecar's (moved) clock: an origin whose answers carry it agrees with the
    sidecar on their age, as a real origin's clock does."""
    return formatdate(sidecar.runtime.cache.clock(), usegmt=True)


async def purge(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                **body: str) -> dict[str, Any]:
    async with client.post(sidecar.admin_url + "/admin/cache/purge", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


# -- storing and hitting ----------------------------------------------------------------------


async def test_miss_is_stored_then_hit_with_age(sidecar_factory, origin, redis_url, client):
    origin.reply("/a", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/a")
    assert first.cache_status == "sidecar; fwd=uri-miss; fwd-status=200; stored"
    second = await fetch(client, sidecar.url + "/a")
    assert second.hit and second.body == first.body == "/a #1"
    assert "ttl=" in second.cache_status
    assert int(second.headers["Age"]) >= 0
    assert second.headers["Content-Length"] == str(len("/a #1"))
    assert origin.calls["/a"] == 1


async def test_upstream_age_counts_against_freshness(sidecar_factory, origin, redis_url, client):
    origin.reply("/aged", headers={"Cache-Control": "max-age=100", "Age": "90"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/aged")
    hit = await fetch(client, sidecar.url + "/aged")
    assert hit.hit
    assert int(hit.headers["Age"]) >= 90
    ttl = int(hit.cache_status.split("ttl=")[1])
    assert 0 <= ttl <= 10


async def test_upstream_freshness_wins_over_policy_ttl(sidecar_factory, origin, redis_url,
                                                       client):
    origin.reply("/short", headers={"Cache-Control": "max-age=1"})
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="1h")
    await fetch(client, sidecar.url + "/short")
    assert (await fetch(client, sidecar.url + "/short")).hit
    move_clock(sidecar, 1.5)
    again = await fetch(client, sidecar.url + "/short")
    assert not again.hit and again.body == "/short #2"


async def test_s_maxage_wins_over_max_age(sidecar_factory, origin, redis_url, client):
    origin.reply("/s", headers={"Cache-Control": "max-age=3600, s-maxage=0"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/s")
    again = await fetch(client, sidecar.url + "/s")
    assert not again.hit and origin.calls["/s"] == 2


async def test_expires_in_the_past_is_stale(sidecar_factory, origin, redis_url, client):
    origin.reply("/e", headers={"Expires": "Thu, 01 Jan 2015 00:00:00 GMT"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/e")
    await fetch(client, sidecar.url + "/e")
    assert origin.calls["/e"] == 2


@pytest.mark.parametrize("form", [
    "%a, %d %b %Y %H:%M:%S AEST",  # a zone other than GMT (once read as GMT)
    "%a %d %b %Y %H:%M:%S GMT",    # no comma
    "%a, %d-%b-%Y %H:%M:%S GMT",   # dashes in an IMF-fixdate
])
async def test_an_invalid_expires_is_already_expired(sidecar_factory, origin, redis_url, client,
                                                     form):
    # RFC 9111 §5.3: the dates are an hour ahead, but not in a form RFC 9110 §5.6.7 allows.
    expires = time.strftime(form, time.gmtime(time.time() + 3600))
    origin.reply("/bad-expires", headers={"Expires": expires})
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="1h")
    await fetch(client, sidecar.url + "/bad-expires")
    again = await fetch(client, sidecar.url + "/bad-expires")
    assert not again.hit and origin.calls["/bad-expires"] == 2, again.cache_status


async def test_fields_the_upstream_connection_names_are_neither_relayed_nor_stored(
        sidecar_factory, redis_url, client):
    # RFC 9110 §7.6.1: X-Hop belongs to the upstream's hop. A raw upstream, since aiohttp's
    # server writes its own Connection header.
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n"
                         b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Kept: 1\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        routes = [{"name": "cached", "match": {"path": "/c/**"}, "upstream": "app",
                   "cache": {"ttl": "60s"}},
                  {"name": "plain", "match": {"path": "/**"}, "upstream": "app"}]
        sidecar = await sidecar_factory(
            make_config(f"http://127.0.0.1:{port}", redis_url, routes=routes))
        first = await fetch(client, sidecar.url + "/c/hop")
        hit = await fetch(client, sidecar.url + "/c/hop")
        plain = await fetch(client, sidecar.url + "/plain")
        assert hit.hit
        for response in (first, hit, plain):
            assert "X-Hop" not in response.headers and response.headers["X-Kept"] == "1"
    finally:
        server.close()


async def test_expires_without_date_counts_from_arrival(sidecar_factory, redis_url, client):
    # aiohttp always sends Date, so this upstream speaks raw HTTP/1.1
    calls = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while (await reader.readuntil(b"\r\n\r\n")):
            calls += 1
            expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nExpires: "
                         + expires.encode() + b"\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        routes = [{"name": "cached", "match": {"path": "/**"}, "upstream": "app",
                   "cache": {"ttl": "0s"}}]
        sidecar = await sidecar_factory(
            make_config(f"http://127.0.0.1:{port}", redis_url, routes=routes))
        await fetch(client, sidecar.url + "/nodate")
        hit = await fetch(client, sidecar.url + "/nodate")
        assert hit.hit and hit.body == "ok" and "Date" in hit.headers
        assert 50 <= int(hit.cache_status.split("ttl=")[1]) <= 60
        assert calls == 1
    finally:
        server.close()


async def test_policy_ttl_applies_without_upstream_freshness(sidecar_factory, origin,
                                                             redis_url, client):
    origin.reply("/plain")
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="30s")
    await fetch(client, sidecar.url + "/plain")
    hit = await fetch(client, sidecar.url + "/plain")
    assert hit.hit and 28 <= int(hit.cache_status.split("ttl=")[1]) <= 30


def ttl_of(reply: Reply) -> int:
    return int(reply.cache_status.split("ttl=")[1].split(";")[0])


async def test_heuristic_freshness_from_last_modified(sidecar_factory, origin, redis_url, client):
    def unchanged_for(seconds: float) -> Callable[[web.Request, int], Awaitable[web.Response]]:
        last_modified = formatdate(time.time() - seconds, usegmt=True)

        async def answer(request: web.Request, n: int) -> web.Response:
            headers = {"Date": formatdate(time.time(), usegmt=True),
                       "Last-Modified": last_modified}
            if request.headers.get("If-Modified-Since") == last_modified:
                return web.Response(status=304, headers=headers)
            return web.Response(text=f"#{n}", headers=headers)
        return answer

    origin.script("/recent", unchanged_for(1000))  # 10% of it: 100 s
    origin.script("/old", unchanged_for(30 * 86400))  # 3 days, capped at 1 h
    origin.reply("/undated")  # no Last-Modified: the route's ttl
    origin.reply("/explicit", headers={"Cache-Control": "max-age=5",
                                       "Last-Modified": "Sun, 06 Nov 1994 08:49:37 GMT"})
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="60s", heuristic="10%",
                          heuristic_max="1h")
    for path in ("/recent", "/old", "/undated", "/explicit"):
        assert "stored" in (await fetch(client, sidecar.url + path)).cache_status
    recent, old, undated, explicit = [await fetch(client, sidecar.url + path)
                                      for path in ("/recent", "/old", "/undated", "/explicit")]
    assert all(reply.hit for reply in (recent, old, undated, explicit))
    assert 98 <= ttl_of(recent) <= 100
    assert 3598 <= ttl_of(old) <= 3600
    assert 58 <= ttl_of(undated) <= 60
    assert ttl_of(explicit) <= 5

    move_clock(sidecar, 101)  # past the heuristic lifetime, not past the 1 h cap
    revalidated = await fetch(client, sidecar.url + "/recent")
    assert "fwd=stale; fwd-status=304" in revalidated.cache_status
    assert revalidated.body == "#1" and origin.seen["/recent"]["If-Modified-Since"]
    assert (await fetch(client, sidecar.url + "/old")).hit
    assert origin.calls["/recent"] == 2 and origin.calls["/old"] == 1


async def test_heuristic_freshness_stores_without_a_ttl(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/lm", headers={"Last-Modified": "Sun, 06 Nov 1994 08:49:37 GMT"})
    origin.reply("/nolm")
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="0s", heuristic="10%")
    await fetch(client, sidecar.url + "/lm")
    hit = await fetch(client, sidecar.url + "/lm")
    assert hit.hit and 86398 <= ttl_of(hit) <= 86400  # heuristic_max's default, 1d
    first = await fetch(client, sidecar.url + "/nolm")
    assert "detail=no-freshness" in first.cache_status


async def test_override_ignores_upstream_freshness(sidecar_factory, origin, redis_url, client):
    origin.reply("/o", headers={"Cache-Control": "max-age=0"})
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="60s", override=True)
    await fetch(client, sidecar.url + "/o")
    assert (await fetch(client, sidecar.url + "/o")).hit
    assert origin.calls["/o"] == 1


@pytest.mark.parametrize("cache_control", ["no-store", "private", "private, max-age=60"])
async def test_no_store_and_private_are_not_stored(sidecar_factory, origin, redis_url, client,
                                                   cache_control):
    origin.reply("/p", headers={"Cache-Control": cache_control})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/p")
    assert "stored" not in first.cache_status and "detail=" in first.cache_status
    second = await fetch(client, sidecar.url + "/p")
    assert not second.hit and second.body == "/p #2"


async def test_request_no_store_is_not_stored(sidecar_factory, origin, redis_url, client):
    origin.reply("/rns", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/rns", headers={"Cache-Control": "no-store"})
    assert not (await fetch(client, sidecar.url + "/rns")).hit


async def test_response_no_cache_is_revalidated_every_time(sidecar_factory, origin, redis_url,
                                                           client):
    async def answer(request: web.Request, n: int) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "no-cache"})
        return web.Response(text="body v1", headers={"ETag": '"v1"', "Cache-Control": "no-cache"})

    origin.script("/nc", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    assert "stored" in (await fetch(client, sidecar.url + "/nc")).cache_status
    second = await fetch(client, sidecar.url + "/nc")
    assert second.status == 200 and second.body == "body v1"
    assert "fwd-status=304" in second.cache_status
    assert origin.calls["/nc"] == 2
    assert origin.seen["/nc"]["If-None-Match"] == '"v1"'


@pytest.mark.parametrize("status,stored", [(200, True), (404, True), (301, True), (500, False),
                                           (302, False), (201, False)])
async def test_only_cacheable_statuses_are_stored_by_default(sidecar_factory, origin,
                                                             redis_url, client, status, stored):
    origin.reply("/status", status=status,
                 headers={"Location": "/elsewhere"} if 300 <= status < 400 else {})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/status", allow_redirects=False)
    second = await fetch(client, sidecar.url + "/status", allow_redirects=False)
    assert second.status == status
    assert second.hit is stored
    assert origin.calls["/status"] == (1 if stored else 2)


async def test_head_is_answered_from_a_stored_get(sidecar_factory, origin, redis_url, client):
    origin.reply("/h", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/h")
    head = await fetch(client, sidecar.url + "/h", method="HEAD")
    assert head.status == 200 and head.hit and head.body == ""
    assert head.headers["Content-Length"] == str(len("/h #1"))
    assert origin.calls["/h"] == 1


# -- targeted cache control (RFC 9213) --------------------------------------------------------


async def test_cdn_cache_control_lets_this_cache_store_what_cache_control_forbids(
        sidecar_factory, origin, redis_url, client):
    origin.reply("/cdn", headers={"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/cdn")
    assert first.cache_status == "sidecar; fwd=uri-miss; fwd-status=200; stored"
    hit = await fetch(client, sidecar.url + "/cdn")
    assert hit.hit and hit.body == "/cdn #1"
    assert 58 <= int(hit.cache_status.split("ttl=")[1]) <= 60
    for response in (first, hit):  # both fields reach the client as the upstream sent them
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["CDN-Cache-Control"] == "max-age=60"
    assert origin.calls["/cdn"] == 1


async def test_cdn_cache_control_no_store_wins_over_cache_control(sidecar_factory, origin,
                                                                  redis_url, client):
    origin.reply("/cdn-ns", headers={"Cache-Control": "max-age=60",
                                     "CDN-Cache-Control": "no-store"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/cdn-ns")
    assert first.cache_status.endswith("detail=no-store")
    assert first.headers["Cache-Control"] == "max-age=60"
    assert not (await fetch(client, sidecar.url + "/cdn-ns")).hit
    assert origin.calls["/cdn-ns"] == 2


async def test_a_targeted_field_replaces_expires_and_the_freshness_flags(sidecar_factory, origin,
                                                                         redis_url, client):
    # Expires long past, and Cache-Control says nothing: CDN-Cache-Control's max-age decides.
    origin.reply("/cdn-exp", headers={"Expires": "Thu, 01 Jan 2015 00:00:00 GMT",
                                      "CDN-Cache-Control": "max-age=60"})

    async def answer(request: web.Request, n: int) -> web.Response:
        headers = {"Cache-Control": "max-age=3600", "CDN-Cache-Control": "no-cache",
                   "ETag": '"v1"'}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(text="body", headers=headers)

    origin.script("/cdn-nc", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/cdn-exp")
    assert (await fetch(client, sidecar.url + "/cdn-exp")).hit
    # no-cache from the targeted field: stored, revalidated on every use, 304s included
    await fetch(client, sidecar.url + "/cdn-nc")
    for _ in range(2):
        again = await fetch(client, sidecar.url + "/cdn-nc")
        assert again.body == "body" and "fwd-status=304" in again.cache_status
    assert origin.calls["/cdn-exp"] == 1 and origin.calls["/cdn-nc"] == 3


async def test_the_first_targeted_field_listed_wins(sidecar_factory, origin, redis_url, client):
    origin.reply("/own-ns", headers={"Sidecar-Cache-Control": "no-store",
                                     "CDN-Cache-Control": "max-age=60"})
    origin.reply("/own-ok", headers={"Sidecar-Cache-Control": "max-age=60",
                                     "CDN-Cache-Control": "no-store", "Cache-Control": "private"})
    # an invalid field (a Dictionary's keys are lower-case) is as if absent: the next decides
    origin.reply("/own-bad", headers={"Sidecar-Cache-Control": "Max-Age=60",
                                      "CDN-Cache-Control": "no-store"})
    sidecar = await start(sidecar_factory, origin, redis_url,
                          targeted=["Sidecar-Cache-Control", "CDN-Cache-Control"])
    for path, stored in (("/own-ns", False), ("/own-ok", True), ("/own-bad", False)):
        first = await fetch(client, sidecar.url + path)
        assert ("stored" in first.cache_status) is stored, (path, first.cache_status)
        assert (await fetch(client, sidecar.url + path)).hit is stored, path
        assert origin.calls[path] == (1 if stored else 2), path


async def test_targeted_fields_can_be_turned_off(sidecar_factory, origin, redis_url, client):
    origin.reply("/off", headers={"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url, targeted=[])
    assert (await fetch(client, sidecar.url + "/off")).cache_status.endswith("detail=no-store")
    assert not (await fetch(client, sidecar.url + "/off")).hit
    assert origin.calls["/off"] == 2


# -- what varies the key ----------------------------------------------------------------------


async def test_vary_stores_one_variant_per_header_value(sidecar_factory, origin, redis_url,
                                                        client):
    async def answer(request: web.Request, n: int) -> web.Response:
        return web.Response(text=f"lang={request.headers.get('Accept-Language')} #{n}",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})

    origin.script("/v", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    fr = await fetch(client, sidecar.url + "/v", headers={"Accept-Language": "fr"})
    de = await fetch(client, sidecar.url + "/v", headers={"Accept-Language": "de"})
    assert "vary-miss" in de.cache_status
    fr2 = await fetch(client, sidecar.url + "/v", headers={"Accept-Language": "fr"})
    de2 = await fetch(client, sidecar.url + "/v", headers={"Accept-Language": "de"})
    assert fr2.hit and de2.hit
    assert (fr2.body, de2.body) == (fr.body, de.body) == ("lang=fr #1", "lang=de #2")
    assert origin.calls["/v"] == 2


async def test_vary_on_a_list_field_ignores_item_order_and_case(sidecar_factory, origin,
                                                                 redis_url, client):
    async def answer(request: web.Request, n: int) -> web.Response:
        return web.Response(text=f"lang={request.headers.get('Accept-Language')} #{n}",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})

    origin.script("/vl", answer)
    a = await start(sidecar_factory, origin, redis_url, name="a.yaml")
    first = await fetch(client, a.url + "/vl", headers={**SHOP, "Accept-Language": "en-US, fr"})
    assert "stored" in first.cache_status
    same = await fetch(client, a.url + "/vl", headers={**SHOP, "Accept-Language": "fr,en-us"})
    assert same.hit and same.body == first.body == "lang=en-US, fr #1"
    other = await fetch(client, a.url + "/vl", headers={**SHOP, "Accept-Language": "en-GB, fr"})
    assert "vary-miss" in other.cache_status and other.body == "lang=en-GB, fr #2"

    # the stored variant is found by the same normalised values in Redis, from another instance
    async def in_l2() -> bool:
        return await l2_entries(redis_url) == 1
    await until(in_l2)
    b = await start(sidecar_factory, origin, redis_url, name="b.yaml")
    from_l2 = await fetch(client, b.url + "/vl", headers={**SHOP, "Accept-Language": " FR ,EN-us"})
    assert from_l2.hit and from_l2.body == "lang=en-US, fr #1"
    assert origin.calls["/vl"] == 2


async def test_vary_star_is_never_served_from_cache(sidecar_factory, origin, redis_url, client):
    origin.reply("/vs", headers={"Cache-Control": "max-age=60", "Vary": "*"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/vs")
    assert not (await fetch(client, sidecar.url + "/vs")).hit
    assert origin.calls["/vs"] == 2


async def test_sorted_query_shares_an_entry(sidecar_factory, origin, redis_url, client):
    origin.reply("/q", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/q?b=2&a=1")
    assert (await fetch(client, sidecar.url + "/q?a=1&b=2")).hit
    assert not (await fetch(client, sidecar.url + "/q?a=1&b=3")).hit


async def test_key_headers_and_cookies_separate_entries(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/k", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url,
                          key={"headers": ["X-Tenant"], "cookies": ["region"]})
    await fetch(client, sidecar.url + "/k", headers={"X-Tenant": "a", "Cookie": "region=eu"})
    assert (await fetch(client, sidecar.url + "/k",
                        headers={"X-Tenant": "a", "Cookie": "region=eu; other=1"})).hit
    assert not (await fetch(client, sidecar.url + "/k",
                            headers={"X-Tenant": "b", "Cookie": "region=eu"})).hit
    assert not (await fetch(client, sidecar.url + "/k",
                            headers={"X-Tenant": "a", "Cookie": "region=us"})).hit


async def test_authorization_requests_stored_only_when_response_allows(sidecar_factory, origin,
                                                                       redis_url, client):
    origin.reply("/private", headers={"Cache-Control": "max-age=60"})
    origin.reply("/shared", headers={"Cache-Control": "public, max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    auth = {"Authorization": "Bearer alice"}
    first = await fetch(client, sidecar.url + "/private", headers=auth)
    assert "stored" not in first.cache_status
    other = await fetch(client, sidecar.url + "/private", headers={"Authorization": "Bearer bob"})
    assert not other.hit and other.body == "/private #2"
    await fetch(client, sidecar.url + "/shared", headers=auth)
    assert (await fetch(client, sidecar.url + "/shared", headers=auth)).hit


async def test_set_cookie_not_stored_unless_policy_says(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/c", headers={"Cache-Control": "max-age=60", "Set-Cookie": "session=alice"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/c")
    second = await fetch(client, sidecar.url + "/c")
    assert not second.hit and origin.calls["/c"] == 2

    allowing = await start(sidecar_factory, origin, redis_url, name="allow.yaml",
                           store_set_cookie=True)
    await fetch(client, allowing.url + "/c")
    assert (await fetch(client, allowing.url + "/c")).hit


async def test_unkeyed_headers_cannot_poison_the_entry(sidecar_factory, origin, redis_url,
                                                       client):
    """A poisoner's X-Forwarded-Host / X-Original-URL / method override never reach what is
    stored for everybody else."""

    async def reflect(request: web.Request, n: int) -> web.Response:
        seen = {name: request.headers.get(name) for name in (
            "X-Forwarded-Host", "X-Original-URL", "X-HTTP-Method-Override", "X-Rewrite-URL")}
        return web.json_response({"method": request.method, **seen},
                                 headers={"Cache-Control": "max-age=60"})

    origin.script("/page", reflect)
    sidecar = await start(sidecar_factory, origin, redis_url)
    poisoner = await fetch(client, sidecar.url + "/page", headers={
        "X-Forwarded-Host": "evil.example", "X-Original-URL": "/admin",
        "X-HTTP-Method-Override": "DELETE", "X-Rewrite-URL": "/admin"})
    assert "stored" in poisoner.cache_status
    victim = await fetch(client, sidecar.url + "/page")
    assert victim.hit
    assert "evil" not in victim.body and "/admin" not in victim.body
    assert "DELETE" not in victim.body
    assert origin.seen["/page"].get("X-Original-URL") is None


# -- conditionals and revalidation ------------------------------------------------------------


async def test_client_if_none_match_gets_304_from_cache(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/t", headers={"Cache-Control": "max-age=60", "ETag": '"abc"'})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/t")
    not_modified = await fetch(client, sidecar.url + "/t",
                               headers={"If-None-Match": 'W/"other", W/"abc"'})
    assert not_modified.status == 304 and not_modified.body == ""
    assert not_modified.headers["ETag"] == '"abc"'
    assert (await fetch(client, sidecar.url + "/t", headers={"If-None-Match": '"zzz"'})).status \
        == 200
    assert origin.calls["/t"] == 1


async def test_client_conditionals_not_forwarded_so_full_response_is_stored(
        sidecar_factory, origin, redis_url, client):
    origin.reply("/cond", headers={"Cache-Control": "max-age=60", "ETag": '"abc"'})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/cond", headers={"If-None-Match": '"abc"'})
    assert first.status == 304
    assert "If-None-Match" not in origin.seen["/cond"]
    full = await fetch(client, sidecar.url + "/cond")
    assert full.status == 200 and full.hit and full.body == "/cond #1"


async def test_generated_etag_answers_if_none_match(sidecar_factory, origin, redis_url, client):
    origin.reply("/g", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url, route={"etag": True})
    first = await fetch(client, sidecar.url + "/g")
    etag = first.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    again = await fetch(client, sidecar.url + "/g", headers={"If-None-Match": etag})
    assert again.status == 304


async def test_etag_without_cache_answers_304_from_fresh_upstream_response(
        sidecar_factory, origin, redis_url, client):
    origin.reply("/u", body="same bytes")
    config = make_config(origin.url, redis_url, routes=[
        {"name": "etag-only", "match": {"path": "/**"}, "upstream": "app", "etag": True}])
    sidecar = await sidecar_factory(config)
    first = await fetch(client, sidecar.url + "/u")
    assert first.headers["ETag"]
    second = await fetch(client, sidecar.url + "/u",
                         headers={"If-None-Match": first.headers["ETag"]})
    assert second.status == 304 and origin.calls["/u"] == 2


async def test_304_from_upstream_refreshes_the_entry(sidecar_factory, origin, redis_url, client):
    async def answer(request: web.Request, n: int) -> web.Response:
        headers = {"Cache-Control": "max-age=1", "ETag": '"v1"', "X-Generation": str(n),
                   "Date": sidecar_date(sidecar)}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(text="original body", headers=headers)

    origin.script("/rv", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/rv")
    move_clock(sidecar, 1.2)
    refreshed = await fetch(client, sidecar.url + "/rv")
    assert refreshed.status == 200 and refreshed.body == "original body"
    assert "fwd-status=304" in refreshed.cache_status
    assert refreshed.headers["X-Generation"] == "2"        # headers updated from the 304
    assert origin.seen["/rv"]["If-None-Match"] == '"v1"'
    hit = await fetch(client, sidecar.url + "/rv")           # freshness restarted
    assert hit.hit and hit.headers["X-Generation"] == "2"
    assert origin.calls["/rv"] == 2


async def test_revalidation_sends_if_modified_since(sidecar_factory, origin, redis_url, client):
    last_modified = "Mon, 02 Nov 2026 10:00:00 GMT"
    origin.reply("/lm", headers={"Cache-Control": "max-age=0", "Last-Modified": last_modified})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/lm")
    await fetch(client, sidecar.url + "/lm")
    assert origin.seen["/lm"]["If-Modified-Since"] == last_modified


@pytest.mark.parametrize("honor,hit", [(True, False), (False, True)])
async def test_client_reload_honoured_or_ignored(sidecar_factory, origin, redis_url, client,
                                                 honor, hit):
    origin.reply("/reload", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url, honor_client_no_cache=honor)
    await fetch(client, sidecar.url + "/reload")
    for header in ({"Cache-Control": "no-cache"}, {"Cache-Control": "max-age=0"},
                   {"Pragma": "no-cache"}):
        assert (await fetch(client, sidecar.url + "/reload", headers=header)).hit is hit


# -- invalidation and purge --------------------------------------------------------------------


async def test_successful_unsafe_method_invalidates_uri_and_location(sidecar_factory, origin,
                                                                     redis_url, client):
    origin.reply("/items/1", headers={"Cache-Control": "max-age=60"})
    origin.reply("/items/2", headers={"Cache-Control": "max-age=60"})
    origin.reply("/items", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    for path in ("/items/1", "/items/2", "/items"):
        await fetch(client, sidecar.url + path)
        assert (await fetch(client, sidecar.url + path)).hit

    async def created(request: web.Request, n: int) -> web.Response:
        return web.Response(status=201, headers={"Location": "/items/2"})

    origin.script("/items", created)
    assert (await fetch(client, sidecar.url + "/items", method="POST", data=b"{}")).status == 201
    origin.reply("/items", headers={"Cache-Control": "max-age=60"})
    assert not (await fetch(client, sidecar.url + "/items")).hit
    assert not (await fetch(client, sidecar.url + "/items/2")).hit
    assert (await fetch(client, sidecar.url + "/items/1")).hit


@pytest.mark.parametrize("method", ["PROPPATCH", "PURGE", "MKCOL"])
async def test_a_method_of_unknown_safety_invalidates_too(sidecar_factory, origin, redis_url,
                                                          client, method):
    # RFC 9111 §4.4: not only POST, PUT, PATCH and DELETE.
    origin.reply("/dav", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/dav")
    assert (await fetch(client, sidecar.url + "/dav")).hit
    assert (await fetch(client, sidecar.url + "/dav", method=method)).status == 200
    assert not (await fetch(client, sidecar.url + "/dav")).hit
    # and a safe one does not
    assert (await fetch(client, sidecar.url + "/dav", method="OPTIONS")).status == 200
    assert (await fetch(client, sidecar.url + "/dav")).hit


@pytest.mark.parametrize("status", [299, 418, 599])
async def test_a_status_the_cache_does_not_know_is_stored_with_explicit_freshness(
        sidecar_factory, origin, redis_url, client, status):
    # RFC 9111 §3: stored on the upstream's word, served while fresh; not on the route's ttl.
    origin.reply("/odd", status=status, headers={"Cache-Control": "max-age=60"})
    origin.reply("/odd-plain", status=status)
    sidecar = await start(sidecar_factory, origin, redis_url, ttl="1h")
    await fetch(client, sidecar.url + "/odd")
    hit = await fetch(client, sidecar.url + "/odd")
    assert hit.hit and hit.status == status and origin.calls["/odd"] == 1
    await fetch(client, sidecar.url + "/odd-plain")
    again = await fetch(client, sidecar.url + "/odd-plain")
    assert not again.hit and origin.calls["/odd-plain"] == 2


async def test_must_understand_is_stored_for_a_known_status_only(sidecar_factory, origin,
                                                               redis_url, client):
    # RFC 9111 §5.2.2.3
    both = {"Cache-Control": "max-age=60, must-understand, no-store"}
    origin.reply("/mu", headers=both)
    origin.reply("/mu-odd", status=418, headers=both)
    sidecar = await start(sidecar_factory, origin, redis_url)
    for path in ("/mu", "/mu-odd"):
        await fetch(client, sidecar.url + path)
        await fetch(client, sidecar.url + path)
    assert origin.calls["/mu"] == 1 and origin.calls["/mu-odd"] == 2


async def test_if_modified_since_without_last_modified_is_answered_by_date(
        sidecar_factory, origin, redis_url, client):
    # RFC 9111 §4.3.2: the stored Date stands in for a missing Last-Modified.
    origin.reply("/nolm", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/nolm")
    assert "Last-Modified" not in first.headers and "ETag" not in first.headers

    def ims(offset: float) -> dict[str, str]:
        when = time.gmtime(time.time() + offset)
        return {"If-Modified-Since": time.strftime("%a, %d %b %Y %H:%M:%S GMT", when)}

    later = await fetch(client, sidecar.url + "/nolm", headers=ims(10))
    assert later.status == 304 and later.body == ""
    earlier = await fetch(client, sidecar.url + "/nolm", headers=ims(-86400))
    assert earlier.status == 200 and earlier.body == first.body
    assert origin.calls["/nolm"] == 1


async def test_failed_unsafe_method_does_not_invalidate(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/keep", headers={"Cache-Control": "max-age=60"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/keep")
    origin.reply("/keep", status=500)
    assert (await fetch(client, sidecar.url + "/keep", method="DELETE")).status == 500
    assert (await fetch(client, sidecar.url + "/keep")).hit


async def test_purge_by_key_prefix_and_tag_across_two_instances(sidecar_factory, origin,
                                                                redis_url, client):
    """Once the purge call returns, neither instance serves the purged bytes (each body carries
    the origin's call number, so a re-fetched entry is told apart from the purged one)."""
    origin.reply("/p/1", headers={"Cache-Control": "max-age=60", "Surrogate-Key": "p1 all"})
    origin.reply("/p/2", headers={"Cache-Control": "max-age=60", "Surrogate-Key": "p2 all"})
    origin.reply("/p/3", headers={"Cache-Control": "max-age=60"})
    origin.reply("/other", headers={"Cache-Control": "max-age=60", "Surrogate-Key": "all"})
    a = await start(sidecar_factory, origin, redis_url, name="a.yaml")
    b = await start(sidecar_factory, origin, redis_url, name="b.yaml")

    async def get(instance: InProcessSidecar, path: str, **headers: str) -> Reply:
        return await fetch(client, instance.url + path, headers={**SHOP, **headers})

    async def warm(path: str) -> str:
        """Cached in both instances' L1 and in L2; returns the cached body."""
        before = await l2_entries(redis_url)
        body = (await get(a, path)).body

        async def in_l2() -> bool:                   # L2 writes happen after the response
            return await l2_entries(redis_url) > before
        await until(in_l2)
        for instance in (b, a):                      # B from L2, filling its own L1
            reply = await get(instance, path)
            assert reply.hit and reply.body == body
        return body

    async def gone(path: str, purged_body: str) -> None:
        for instance in (a, b):              # no-store: a miss here does not refill the cache
            reply = await get(instance, path, **{"Cache-Control": "no-store"})
            assert reply.body != purged_body, (instance.url, path, reply.cache_status)

    bodies = {path: await warm(path) for path in ("/p/1", "/p/2", "/p/3?x=1", "/other")}
    assert counted(await stats(client, b), "redis", "hit") >= 4

    result = await purge(client, a, key="/p/1")
    assert result["instances_acked"] == result["instances_notified"] == 2
    assert result["redis_removed"] == 1
    await gone("/p/1", bodies["/p/1"])
    assert (await get(b, "/p/2")).body == bodies["/p/2"]

    bodies["/p/1"] = await warm("/p/1")
    result = await purge(client, b, tag="p2")
    assert result["instances_acked"] == 2 and result["redis_removed"] == 1
    await gone("/p/2", bodies["/p/2"])
    assert (await get(a, "/p/1")).body == bodies["/p/1"]

    bodies["/p/2"] = await warm("/p/2")
    result = await purge(client, a, prefix="/p/")
    assert result["instances_acked"] == 2 and result["redis_removed"] == 3
    for path in ("/p/1", "/p/2", "/p/3?x=1"):
        await gone(path, bodies[path])
    for instance in (a, b):
        assert (await get(instance, "/other")).body == bodies["/other"]

    await purge(client, b, tag="all")
    await gone("/other", bodies["/other"])


async def test_purge_rejects_bad_bodies(sidecar_factory, origin, redis_url, client):
    sidecar = await start(sidecar_factory, origin, redis_url)
    for body in ({}, {"key": ""}, {"key": "no-slash"}, {"key": "/a", "tag": "b"}, ["/a"],
                 {"tag": 3}):
        async with client.post(sidecar.admin_url + "/admin/cache/purge", json=body) as response:
            assert response.status == 400, body
            assert "detail" in await response.json()


async def test_purge_requires_the_admin_token_when_set(sidecar_factory, origin, redis_url,
                                                       client):
    config = cache_config(origin, redis_url)
    config["admin"] = {"token": "s3cret-token"}
    sidecar = await sidecar_factory(config)
    url = sidecar.admin_url + "/admin/cache/purge"
    async with client.post(url, json={"key": "/a"}) as response:
        assert response.status == 401
    async with client.post(url, json={"key": "/a"},
                           headers={"Authorization": "Bearer wrong"}) as response:
        assert response.status == 401
    async with client.post(url, json={"key": "/a"},
                           headers={"Authorization": "Bearer s3cret-token"}) as response:
        assert response.status == 200


# -- layers -----------------------------------------------------------------------------------


async def test_l1_evicts_least_recently_used_by_bytes(sidecar_factory, origin, redis_url, client):
    body = "x" * 1000
    for i in range(20):
        origin.reply(f"/big/{i}", headers={"Cache-Control": "max-age=60"}, body=body)
    sidecar = await start(sidecar_factory, origin, redis_url, layers=["memory"],
                          memory={"max_bytes": "8KiB", "max_entry": "4KiB"})
    for i in range(20):
        await fetch(client, sidecar.url + f"/big/{i}")
    memory = (await stats(client, sidecar))["memory"]["cached"]
    assert 0 < memory["bytes"] <= 8 * 1024
    assert memory["evictions"] >= 10 and memory["entries"] < 20
    assert (await fetch(client, sidecar.url + "/big/19")).hit
    assert not (await fetch(client, sidecar.url + "/big/0")).hit


async def rewrite_l2_bodies(redis_url: str, body: bytes) -> None:
    """What another instance storing a new version would do: every entry in Redis gets `body`."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for name in await redis.keys("sidecar:cache:e:*"):
            for field, packed in (await redis.hgetall(name)).items():
                entry = CachedResponse.unpack(packed)
                entry.body = body
                entry.headers = [(n, str(len(body)).encode() if n == b"Content-Length" else v)
                                 for n, v in entry.headers]
                await redis.hset(name, field, entry.pack())
    finally:
        await redis.aclose()


async def test_memory_max_ttl_bounds_l1_then_l2_is_read(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/short-l1", headers={"Cache-Control": "max-age=3600"})
    sidecar = await start(sidecar_factory, origin, redis_url, memory={"max_ttl": "10s"})
    assert "stored" in (await fetch(client, sidecar.url + "/short-l1")).cache_status

    async def in_l2() -> bool:
        return await l2_entries(redis_url) == 1
    await until(in_l2)
    await rewrite_l2_bodies(redis_url, b"from redis")
    within = await fetch(client, sidecar.url + "/short-l1")
    assert within.hit and within.body == "/short-l1 #1"  # L1, not read from Redis
    assert counted(await stats(client, sidecar), "redis", "hit") == 0

    move_clock(sidecar, 11)  # past max_ttl, still fresh
    past = await fetch(client, sidecar.url + "/short-l1")
    assert past.hit and past.body == "from redis"
    assert past.headers["Content-Length"] == str(len("from redis"))
    again = await fetch(client, sidecar.url + "/short-l1")  # L1 holds Redis's version now
    assert again.hit and again.body == "from redis"
    counts = await stats(client, sidecar)
    assert counted(counts, "redis", "hit") == 1 and counted(counts, "memory", "hit") == 2
    assert origin.calls["/short-l1"] == 1


async def test_without_memory_max_ttl_l1_serves_while_fresh(sidecar_factory, origin,
                                                            redis_url, client):
    origin.reply("/long-l1", headers={"Cache-Control": "max-age=3600"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/long-l1")

    async def in_l2() -> bool:
        return await l2_entries(redis_url) == 1
    await until(in_l2)
    await rewrite_l2_bodies(redis_url, b"from redis")
    move_clock(sidecar, 3000)
    late = await fetch(client, sidecar.url + "/long-l1")
    assert late.hit and late.body == "/long-l1 #1"
    assert counted(await stats(client, sidecar), "redis", "hit") == 0


async def test_entries_larger_than_max_entry_pass_unstored(sidecar_factory, origin, redis_url,
                                                           client):
    origin.reply("/huge", headers={"Cache-Control": "max-age=60"}, body="y" * 5000)
    sidecar = await start(sidecar_factory, origin, redis_url, layers=["memory"],
                          memory={"max_bytes": "1MiB", "max_entry": "1KiB"})
    first = await fetch(client, sidecar.url + "/huge")
    assert len(first.body) == 5000 and "too-large" in first.cache_status
    assert not (await fetch(client, sidecar.url + "/huge")).hit


async def test_streamed_response_is_buffered_and_stored(sidecar_factory, origin, redis_url,
                                                        client):
    async def chunked(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(10):
            await response.write(f"chunk{i};".encode())
        await response.write_eof()
        return response

    origin.script("/chunked", chunked)
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await fetch(client, sidecar.url + "/chunked")
    hit = await fetch(client, sidecar.url + "/chunked")
    assert hit.hit and hit.body == first.body == "".join(f"chunk{i};" for i in range(10))


async def test_l2_hit_on_a_second_instance_fills_its_l1(sidecar_factory, origin, redis_url,
                                                        client):
    origin.reply("/shared", headers={"Cache-Control": "max-age=60"})
    a = await start(sidecar_factory, origin, redis_url, name="a.yaml")
    b = await start(sidecar_factory, origin, redis_url, name="b.yaml")
    await fetch(client, a.url + "/shared", headers=SHOP)

    async def in_l2() -> bool:
        return await l2_entries(redis_url) == 1
    await until(in_l2)
    assert (await fetch(client, b.url + "/shared", headers=SHOP)).hit
    assert (await fetch(client, b.url + "/shared", headers=SHOP)).hit
    b_stats = await stats(client, b)
    assert counted(b_stats, "redis", "hit") == 1 and counted(b_stats, "memory", "hit") >= 1
    assert origin.calls["/shared"] == 1


async def test_redis_killed_mid_test_requests_still_answered(sidecar_factory, origin,
                                                             own_redis: RedisServer, client):
    origin.reply("/warm", headers={"Cache-Control": "max-age=60"})
    origin.reply("/cold", headers={"Cache-Control": "max-age=60"})
    config = cache_config(origin, own_redis.url)
    config["cache"] = {"l1_without_redis": "serve"}
    sidecar = await sidecar_factory(config)
    await fetch(client, sidecar.url + "/warm")
    own_redis.kill()
    for _ in range(5):
        assert (await fetch(client, sidecar.url + "/warm")).hit
    cold = await fetch(client, sidecar.url + "/cold")
    assert cold.status == 200 and "stored" in cold.cache_status
    assert (await fetch(client, sidecar.url + "/cold")).hit

    async def degraded() -> bool:
        return (await stats(client, sidecar))["redis"]["status"] == "down"
    await until(degraded)
    result = await purge(client, sidecar, key="/warm")
    assert result["redis"] == "down" and result["memory_removed"] == 1
    assert not (await fetch(client, sidecar.url + "/warm")).hit


# -- stale ------------------------------------------------------------------------------------


async def test_stale_while_revalidate_refreshes_once(sidecar_factory, origin, redis_url, client):
    async def slow(request: web.Request, n: int) -> web.Response:
        if n > 1:
            await asyncio.sleep(0.3)
        return web.Response(text=f"version {n}", headers={"Cache-Control": "max-age=1",
                                                          "Date": sidecar_date(sidecar)})

    origin.script("/swr", slow)
    sidecar = await start(sidecar_factory, origin, redis_url, stale_while_revalidate="30s")
    await fetch(client, sidecar.url + "/swr")
    move_clock(sidecar, 1.2)
    started = time.monotonic()
    replies = await asyncio.gather(*(fetch(client, sidecar.url + "/swr") for _ in range(20)))
    assert time.monotonic() - started < 0.3          # nobody waited for the refresh
    assert all(r.body == "version 1" and "stale-while-revalidate" in r.cache_status
               for r in replies)

    async def refreshed() -> bool:
        return (await fetch(client, sidecar.url + "/swr")).body == "version 2"
    await until(refreshed)
    assert origin.calls["/swr"] == 2

    move_clock(sidecar, 1.2)                          # the next expiry refreshes again
    await fetch(client, sidecar.url + "/swr")

    async def refreshed_again() -> bool:
        return (await fetch(client, sidecar.url + "/swr")).body == "version 3"
    await until(refreshed_again)


async def test_stale_if_error_on_5xx_and_on_unreachable_upstream(sidecar_factory, origin,
                                                                 redis_url, client):
    origin.reply("/sie", headers={"Cache-Control": "max-age=1"}, body="good")
    sidecar = await start(sidecar_factory, origin, redis_url, stale_if_error="60s")
    await fetch(client, sidecar.url + "/sie")
    move_clock(sidecar, 1.2)
    origin.reply("/sie", status=503, body="broken")
    stale = await fetch(client, sidecar.url + "/sie")
    assert stale.status == 200 and stale.body == "good"
    assert "fwd=stale" in stale.cache_status and "stale-if-error" in stale.cache_status

    dead = make_config("http://127.0.0.1:1", redis_url)  # nothing listens on port 1
    sidecar.config_path.write_text(sidecar.config_path.read_text().replace(
        origin.url, dead["upstreams"]["app"]["url"]))
    assert await sidecar.runtime.reload("test")
    unreachable = await fetch(client, sidecar.url + "/sie")
    assert unreachable.status == 200 and unreachable.body == "good"
    assert "stale-if-error" in unreachable.cache_status


async def test_stale_if_error_not_used_when_must_revalidate(sidecar_factory, origin, redis_url,
                                                            client):
    origin.reply("/mr", headers={"Cache-Control": "max-age=1, must-revalidate"}, body="good")
    sidecar = await start(sidecar_factory, origin, redis_url, stale_if_error="60s")
    await fetch(client, sidecar.url + "/mr")
    move_clock(sidecar, 1.2)
    origin.reply("/mr", status=503, body="broken")
    reply = await fetch(client, sidecar.url + "/mr")
    assert reply.status == 503 and reply.body == "broken"


async def test_every_response_through_the_policy_has_cache_status(sidecar_factory, origin,
                                                                  redis_url, client):
    origin.reply("/any", status=500)
    sidecar = await start(sidecar_factory, origin, redis_url)
    for method in ("GET", "HEAD"):
        reply = await fetch(client, sidecar.url + "/any", method=method)
        assert reply.cache_status.startswith("sidecar; fwd=")


async def test_stats_count_per_layer_and_index_of_expired_entries_is_pruned(
        sidecar_factory, origin, redis_url, client):
    origin.reply("/brief", headers={"Cache-Control": "max-age=0"})
    sidecar = await start(sidecar_factory, origin, redis_url)
    await fetch(client, sidecar.url + "/brief")
    body = await stats(client, sidecar)
    assert counted(body, "memory", "store") == 1 and counted(body, "redis", "store") == 1
    assert counted(body, "-", "miss") == 1
    assert body["memory"]["cached"]["entries"] == 1 and body["memory"]["cached"]["bytes"] > 0

    async def indexed() -> bool:
        return (await stats(client, sidecar))["redis"].get("entries") == 1
    await until(indexed)
    assert (await stats(client, sidecar))["redis"]["used_memory"] > 0
    store = sidecar.runtime.cache.store
    assert store is not None
    assert await store.prune(time.time()) == 0      # kept for max(swr, sie, 60 s) past expiry
    redis = aioredis.Redis.from_url(redis_url)
    try:
        members = await redis.zrange("sidecar:cache:uris:exp", 0, -1)
        # An index that says "expired" of an entry Redis still holds is corrected, not obeyed.
        await redis.zadd("sidecar:cache:uris:exp", dict.fromkeys(members, 1), xx=True)
        assert await store.prune(time.time()) == 1
        assert await redis.zscore("sidecar:cache:uris:exp", members[0]) > time.time() * 1000
        assert await redis.zcard("sidecar:cache:uris") == 1
        # Once Redis has expired the entry, its index members and its bytes go.
        await redis.zadd("sidecar:cache:uris:exp", dict.fromkeys(members, 1), xx=True)
        await redis.delete(*await redis.keys("sidecar:cache:e:*"))
        assert int(await redis.get("sidecar:cache:bytes")) > 0
        assert await store.prune(time.time()) == 1
        assert await redis.zcard("sidecar:cache:uris") == 0
        assert await redis.zcard("sidecar:cache:uris:exp") == 0
        assert await redis.zcard("sidecar:cache:lru") == 0
        assert int(await redis.get("sidecar:cache:bytes")) == 0
    finally:
        await redis.aclose()
