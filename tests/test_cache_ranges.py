"""Range requests answered from the cache (RFC 9110 §14), end to end: a real upstream scripted
per test, real Redis, a real client. The rules are in docs/caching.md; the parsing is tested
on its own in tests/core/test_ranges.py."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from support import Origin, until
from test_cache import Factory, l2_entries, start

# Every byte value, four times over: a slice at the wrong offset cannot look right.
BODY = bytes(range(256)) * 4
LENGTH = len(BODY)


class Reply:
    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def cache_status(self) -> str:
        return self.headers.get("Cache-Status", "")


async def get(client: aiohttp.ClientSession, url: str, method: str = "GET",
              **headers: str) -> Reply:
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    async with client.request(method, url, headers=sent) as response:
        return Reply(response.status, response.headers, await response.read())


def serve_body(origin: Origin, path: str, **extra: str) -> str:
    """`path` answers BODY, fresh for a minute, with an ETag and a Last-Modified an hour old;
    returns that Last-Modified."""
    last_modified = formatdate(time.time() - 3600, usegmt=True)
    headers = {"Cache-Control": "max-age=60", "ETag": '"v1"', "Last-Modified": last_modified,
               "Content-Type": "application/octet-stream", **extra}

    async def answer(request: web.Request, n: int) -> web.Response:
        return web.Response(body=BODY, headers=headers)

    origin.script(path, answer)
    return last_modified


async def stored(factory: Factory, origin: Origin, redis_url: str, path: str,
                 client: aiohttp.ClientSession, **cache: Any) -> str:
    """A sidecar with BODY stored for `path`; returns its URL."""
    serve_body(origin, path)
    sidecar = await start(factory, origin, redis_url, **cache)
    first = await get(client, sidecar.url + path)
    assert first.status == 200 and "stored" in first.cache_status, first.cache_status
    return sidecar.url


@pytest.mark.parametrize(("range_value", "start", "end"), [
    ("bytes=0-99", 0, 99),
    ("bytes=100-", 100, LENGTH - 1),
    ("bytes=-10", LENGTH - 10, LENGTH - 1),
    ("bytes=1000-5000", 1000, LENGTH - 1),  # last past the end: up to the end
    ("bytes=0-0", 0, 0),
])
async def test_a_range_of_a_stored_response_is_its_slice(sidecar_factory, origin, redis_url,
                                                         client, range_value, start, end):
    url = await stored(sidecar_factory, origin, redis_url, "/file", client)
    part = await get(client, url + "/file", Range=range_value)
    assert part.status == 206, part.cache_status
    assert part.body == BODY[start : end + 1]
    assert part.headers["Content-Range"] == f"bytes {start}-{end}/{LENGTH}"
    assert part.headers["Content-Length"] == str(end - start + 1)
    # the stored response's fields, as a 200 from the cache would carry them
    assert part.headers["ETag"] == '"v1"'
    assert part.headers["Content-Type"] == "application/octet-stream"
    assert part.headers["Cache-Control"] == "max-age=60"
    assert part.cache_status.startswith("sidecar; hit")
    assert origin.calls["/file"] == 1


async def test_a_second_instance_answers_a_range_from_redis(sidecar_factory, origin, redis_url,
                                                            client):
    serve_body(origin, "/shared")
    a = await start(sidecar_factory, origin, redis_url, name="a.yaml")
    b = await start(sidecar_factory, origin, redis_url, name="b.yaml")
    await get(client, a.url + "/shared", Host="shop.example")

    async def in_l2() -> bool:
        return await l2_entries(redis_url) == 1
    await until(in_l2)
    part = await get(client, b.url + "/shared", Host="shop.example", Range="bytes=10-19")
    assert part.status == 206 and part.body == BODY[10:20]
    assert part.cache_status.startswith("sidecar; hit")
    assert origin.calls["/shared"] == 1


async def test_an_unsatisfiable_range_gets_416_with_the_length(sidecar_factory, origin,
                                                               redis_url, client):
    url = await stored(sidecar_factory, origin, redis_url, "/short", client)
    for range_value in (f"bytes={LENGTH}-", f"bytes={LENGTH + 10}-{LENGTH + 20}", "bytes=-0"):
        refused = await get(client, url + "/short", Range=range_value)
        assert refused.status == 416, range_value
        assert refused.headers["Content-Range"] == f"bytes */{LENGTH}"
        assert refused.body == b"" and refused.headers["Content-Length"] == "0"
        assert refused.headers["ETag"] == '"v1"'
        # nothing that would let a cache downstream keep the 416 for the URI
        assert "Cache-Control" not in refused.headers and "Expires" not in refused.headers
    assert origin.calls["/short"] == 1


async def test_if_range_sends_the_part_only_for_the_same_version(sidecar_factory, origin,
                                                                 redis_url, client):
    last_modified = serve_body(origin, "/v")
    sidecar = await start(sidecar_factory, origin, redis_url)
    await get(client, sidecar.url + "/v")

    async def ranged(if_range: str) -> Reply:
        return await get(client, sidecar.url + "/v", Range="bytes=0-9", If_Range=if_range)

    same = await ranged('"v1"')
    assert same.status == 206 and same.body == BODY[:10]
    by_date = await ranged(last_modified)
    assert by_date.status == 206 and by_date.body == BODY[:10]
    for outdated in ('"v0"', 'W/"v1"', formatdate(time.time() - 7200, usegmt=True), "soon"):
        whole = await ranged(outdated)
        assert whole.status == 200 and whole.body == BODY, outdated
        assert "Content-Range" not in whole.headers
    assert origin.calls["/v"] == 1


async def test_if_none_match_is_answered_before_the_range(sidecar_factory, origin, redis_url,
                                                          client):
    url = await stored(sidecar_factory, origin, redis_url, "/inm", client)
    not_modified = await get(client, url + "/inm", Range="bytes=0-9", If_None_Match='"v1"')
    assert not_modified.status == 304 and not_modified.body == b""
    assert origin.calls["/inm"] == 1


@pytest.mark.parametrize("range_value", [
    "bytes=0-1,5-6",  # several ranges
    "bytes=5-1",  # last before first
    "bytes=abc",
    "lines=1-2",  # another unit
])
async def test_ranges_the_cache_ignores_get_the_whole_response(sidecar_factory, origin,
                                                               redis_url, client, range_value):
    url = await stored(sidecar_factory, origin, redis_url, "/multi", client)
    whole = await get(client, url + "/multi", Range=range_value)
    assert whole.status == 200 and whole.body == BODY
    assert whole.cache_status.startswith("sidecar; hit")
    assert origin.calls["/multi"] == 1


async def test_head_ignores_range(sidecar_factory, origin, redis_url, client):
    # RFC 9110 §14.2: range handling is defined for GET only.
    url = await stored(sidecar_factory, origin, redis_url, "/head", client)
    head = await get(client, url + "/head", "HEAD", Range="bytes=0-9")
    assert head.status == 200 and head.headers["Content-Length"] == str(LENGTH)
    assert origin.calls["/head"] == 1


async def test_a_part_of_something_not_stored_is_forwarded_and_not_stored(
        sidecar_factory, origin, redis_url, client):
    async def answer(request: web.Request, n: int) -> web.Response:
        if request.headers.get("Range") == "bytes=0-9":
            return web.Response(status=206, body=BODY[:10], headers={
                "Content-Range": f"bytes 0-9/{LENGTH}", "Cache-Control": "max-age=60"})
        return web.Response(body=BODY, headers={"Cache-Control": "max-age=60"})

    origin.script("/miss", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    part = await get(client, sidecar.url + "/miss", Range="bytes=0-9")
    assert part.status == 206 and part.body == BODY[:10]
    assert part.cache_status == "sidecar; fwd=uri-miss; fwd-status=206; detail=range"
    assert origin.seen["/miss"]["Range"] == "bytes=0-9"
    # the 206 was not stored: the next GET fetches the whole and stores it...
    whole = await get(client, sidecar.url + "/miss")
    assert whole.status == 200 and "stored" in whole.cache_status
    # ...and from then on ranges come from the cache
    again = await get(client, sidecar.url + "/miss", Range="bytes=0-9")
    assert again.status == 206 and again.cache_status.startswith("sidecar; hit")
    assert again.body == BODY[:10]
    assert origin.calls["/miss"] == 2


async def test_bytes_0_on_a_miss_fetches_the_whole_and_stores_it(sidecar_factory, origin,
                                                                 redis_url, client):
    serve_body(origin, "/all")
    sidecar = await start(sidecar_factory, origin, redis_url)
    first = await get(client, sidecar.url + "/all", Range="bytes=0-")
    assert first.status == 206 and first.body == BODY
    assert first.headers["Content-Range"] == f"bytes 0-{LENGTH - 1}/{LENGTH}"
    assert "stored" in first.cache_status
    assert "Range" not in origin.seen["/all"]
    second = await get(client, sidecar.url + "/all", Range="bytes=-4")
    assert second.status == 206 and second.body == BODY[-4:]
    assert origin.calls["/all"] == 1


async def test_a_stale_entry_is_revalidated_whole_before_the_part(sidecar_factory, origin,
                                                                  redis_url, client):
    async def answer(request: web.Request, n: int) -> web.Response:
        headers = {"Cache-Control": "no-cache", "ETag": '"v1"'}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=BODY, headers=headers)

    origin.script("/nc", answer)
    sidecar = await start(sidecar_factory, origin, redis_url)
    await get(client, sidecar.url + "/nc")
    part = await get(client, sidecar.url + "/nc", Range="bytes=5-9")
    assert part.status == 206 and part.body == BODY[5:10]
    assert "fwd-status=304" in part.cache_status
    assert "Range" not in origin.seen["/nc"]  # what is stored stays the whole response
    assert origin.calls["/nc"] == 2
