"""Cache poisoning: one client sends the attack, a second, clean client must not see its effect.

The upstream here is a mirror: it answers every request with what it was sent (the target as
sent, the method, the headers an application might act on) in a cacheable body, so anything
an attacker manages to smuggle into a stored entry shows up in the clean client's body.
Requests are written by hand on a socket: HTTP client libraries normalise the very paths
these tests need to send as they are.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

import pytest
import redis.asyncio as aioredis
import yarl
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from support import InProcessSidecar, free_port, make_config, until

from sidecar.core.cachekey import normalize_target
from sidecar.stores.memory import MAX_VARIANTS

Factory = Callable[..., Awaitable[InProcessSidecar]]
EVIL = "evil.example"

# What a mirror reports of each request: the headers frameworks are known to act on.
ECHOED = (
    "Host", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-For", "Forwarded",
    "X-Forwarded-Prefix", "X-Forwarded-Port", "X-Forwarded-Scheme", "X-Forwarded-Server",
    "X-Host", "X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override", "X-HTTP-Method",
    "X-Method-Override", "Cookie", "Authorization",
)


class Mirror:
    """An upstream answering any target with what it saw, as JSON, with `headers` added."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.headers: dict[str, str] = {"Cache-Control": "max-age=60"}
        self.calls = 0
        self.seen: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.BaseRequest) -> web.Response:
        self.calls += 1
        seen = {"label": self.label, "call": self.calls, "method": request.method,
                "target": request.raw_path,
                **{name: request.headers.getall(name, None) for name in ECHOED}}
        self.seen.append(seen)
        return web.Response(body=json.dumps(seen).encode(), content_type="application/json",
                            headers=self.headers)


@pytest.fixture
async def mirrors() -> AsyncIterator[dict[str, Mirror]]:
    """Two mirrors, `app` and `admin`, on free ports."""
    runners = []
    found = {}
    for label in ("app", "admin"):
        mirror = Mirror(label)
        runner = web.ServerRunner(web.Server(mirror.handle), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        mirror.url = f"http://127.0.0.1:{port}"
        runners.append(runner)
        found[label] = mirror
    yield found
    for runner in runners:
        await runner.cleanup()


@dataclass
class Raw:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def cache_status(self) -> str:
        return self.headers.get("Cache-Status", "")

    @property
    def hit(self) -> bool:
        return self.cache_status.startswith("sidecar; hit")

    @property
    def stored(self) -> bool:
        return self.cache_status.endswith("; stored")

    def json(self) -> Any:
        return json.loads(self.body)


async def send(base: str, target: str, headers: Sequence[tuple[str, str]] = (),
               method: str = "GET", host: str = "shop.example") -> Raw:
    """One request written as is (target and header lines untouched), on its own connection."""
    url = yarl.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close",
                 *(f"{name}: {value}" for name, value in headers)]
        if method in ("POST", "PUT"):
            lines.append("Content-Length: 0")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "Content-Length" in parsed:
        body = body[:int(parsed["Content-Length"])]
    return Raw(int(status_line.split(" ")[1]), parsed, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def cached_routes(**cache: Any) -> list[dict[str, Any]]:
    cache.setdefault("ttl", "60s")
    return [{"name": "cached", "match": {"path": "/**"}, "upstream": "app", "cache": cache}]


async def start(factory: Factory, mirror: Mirror, redis_url: str, *,
                server: dict[str, Any] | None = None, name: str = "config.yaml",
                **cache: Any) -> InProcessSidecar:
    config = make_config(mirror.url, redis_url, routes=cached_routes(**cache))
    if server:
        config["server"].update(server)
    return await factory(config, name)


# -- unkeyed headers ---------------------------------------------------------------------------

# Request headers a client controls that are not part of the cache key, with a poisonous value.
UNKEYED = [
    ("X-Forwarded-Host", EVIL),
    ("X-Forwarded-Proto", "evil"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("Forwarded", f"for=6.6.6.6;host={EVIL};proto=https"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Port", "6666"),
    ("X-Forwarded-Scheme", "evil"),
    ("X-Forwarded-Server", EVIL),
    ("X-Host", EVIL),
    ("X-Original-URL", "/evil"),
    ("X-Rewrite-URL", "/evil"),
]


@pytest.mark.parametrize(("name", "value"), UNKEYED, ids=[n for n, _ in UNKEYED])
async def test_unkeyed_header_cannot_poison_the_entry(sidecar_factory, mirrors, redis_url, name,
                                                      value):
    """trust_forwarded off: an attacker's header is either not passed on or not stored for
    everybody; a clean client never gets a body built from it."""
    app = mirrors["app"]
    sidecar = await start(sidecar_factory, app, redis_url)
    poisoner = await send(sidecar.url, "/page", [(name, value)])
    assert poisoner.status == 200
    victim = await send(sidecar.url, "/page")
    assert victim.status == 200
    assert value not in victim.body.decode(), victim.body
    # Nor does the origin see it, when the response was stored under the shared key.
    if poisoner.stored:
        assert all(value not in str(v) for v in app.seen[0].values())


async def test_an_absolute_form_target_cannot_poison_the_origin_form_entry(
        sidecar_factory, mirrors, redis_url):
    """`GET http://evil.example/page` with `Host: shop.example`: whatever the upstream makes of
    it is not what `GET /page` on shop.example gets."""
    app = mirrors["app"]
    sidecar = await start(sidecar_factory, app, redis_url)
    await send(sidecar.url, f"http://{EVIL}/page")
    victim = await send(sidecar.url, "/page")
    assert victim.status == 200 and not victim.hit
    assert EVIL not in victim.body.decode()
    assert (await send(sidecar.url, "/page")).hit


async def test_stripped_forwarding_leaves_the_sidecars_own(sidecar_factory, mirrors, redis_url):
    """What the sidecar sets itself (X-Forwarded-For of the peer, -Proto, -Host from Host)
    still reaches the upstream of a cached route."""
    app = mirrors["app"]
    sidecar = await start(sidecar_factory, app, redis_url)
    await send(sidecar.url, "/own", [("X-Forwarded-For", "6.6.6.6")])
    seen = app.seen[-1]
    assert seen["X-Forwarded-For"] == ["127.0.0.1"]
    assert seen["X-Forwarded-Host"] == ["shop.example"]
    assert seen["X-Forwarded-Proto"] == ["http"]


async def test_trusted_forwarded_host_and_proto_are_part_of_the_key(sidecar_factory, mirrors,
                                                                    redis_url):
    """Behind a trusted load balancer the upstream builds URLs from X-Forwarded-Host/-Proto:
    public hosts sharing one Host on the way in must not share entries."""
    app = mirrors["app"]
    sidecar = await start(sidecar_factory, app, redis_url, server={"trust_forwarded": True})
    a = [("X-Forwarded-Host", "a.example"), ("X-Forwarded-Proto", "https")]
    first = await send(sidecar.url, "/page", a)
    assert first.stored and first.json()["X-Forwarded-Host"] == ["a.example"]
    other_host = await send(sidecar.url, "/page", [("X-Forwarded-Host", "b.example"),
                                                   ("X-Forwarded-Proto", "https")])
    assert not other_host.hit and other_host.json()["X-Forwarded-Host"] == ["b.example"]
    other_proto = await send(sidecar.url, "/page", [("X-Forwarded-Host", "a.example"),
                                                    ("X-Forwarded-Proto", "http")])
    assert not other_proto.hit and other_proto.json()["X-Forwarded-Proto"] == ["http"]
    bare = await send(sidecar.url, "/page")
    assert not bare.hit and "a.example" not in bare.body.decode()
    again = await send(sidecar.url, "/page", a)
    assert again.hit and again.json()["call"] == 1


async def test_method_override_is_neither_forwarded_nor_acted_on(sidecar_factory, mirrors,
                                                                 redis_url):
    app = mirrors["app"]
    sidecar = await start(sidecar_factory, app, redis_url)
    overrides = [("X-HTTP-Method-Override", "POST"), ("X-HTTP-Method", "DELETE"),
                 ("X-Method-Override", "PUT")]
    # A GET with an override is a GET: stored as such, the upstream never sees the override...
    first = await send(sidecar.url, "/m", overrides)
    assert first.stored
    assert app.seen[-1]["method"] == "GET"
    assert all(app.seen[-1][name] is None for name, _ in overrides)
    victim = await send(sidecar.url, "/m")
    assert victim.hit and victim.json()["method"] == "GET"
    # ... and the sidecar does not take it for an unsafe method (which would invalidate /m).
    await send(sidecar.url, "/m", overrides)
    assert (await send(sidecar.url, "/m")).hit
    # A POST that claims to be a GET is not answered from the cache, and invalidates.
    post = await send(sidecar.url, "/m", [("X-HTTP-Method-Override", "GET")], method="POST")
    assert not post.hit and app.seen[-1]["method"] == "POST"
    assert not (await send(sidecar.url, "/m")).hit
    assert app.calls == 3


# -- paths and queries ------------------------------------------------------------------------

# Pairs of targets that some origin treats differently: they must never share an entry.
DISTINCT = [
    ("/p/x/../b", "/p/b"),
    ("/p/%2e%2e/b", "/b"),
    ("/p/./b", "/p/b"),
    ("//p/b", "/p/b"),
    ("/p//b", "/p/b"),
    ("/p/b;v=1", "/p/b"),
    ("/p/b%2Fc", "/p/b%2fc"),
    ("/p/b%2Fc", "/p/b/c"),
    ("/p/%61", "/p/a"),
    ("/p?q=a+b", "/p?q=a%20b"),
    ("/p?id=1&id=2", "/p?id=2&id=1"),
    ("/p?%61=1&a=2", "/p?a=2&%61=1"),
    ("/p?a+b=1&a%20b=2", "/p?a%20b=2&a+b=1"),
    ("/p?x=1;a=2&a=3", "/p?a=3&x=1;a=2"),
    ("/p?a", "/p?a="),
    ("/p?A=1", "/p?a=1"),
]


@pytest.mark.parametrize(("first", "second"), DISTINCT, ids=[f"{a} {b}" for a, b in DISTINCT])
async def test_targets_an_origin_may_tell_apart_never_share_an_entry(
        sidecar_factory, mirrors, redis_url, first, second):
    app = mirrors["app"]
    sidecar = await start(sidecar_factory, app, redis_url)
    stored = await send(sidecar.url, first)
    assert stored.status == 200 and stored.stored, stored.cache_status
    other = await send(sidecar.url, second)
    assert other.status == 200
    assert not other.hit and other.json()["target"] == second
    assert (await send(sidecar.url, first)).hit  # each has its own entry


# How applications read query parameter names: as sent, percent-decoded, `+` as a space,
# case-insensitively (ASP.NET), with `.` and spaces as `_` (PHP).
READINGS: list[Callable[[str], str]] = [
    lambda name: name,
    unquote,
    unquote_plus,
    lambda name: unquote_plus(name).lower(),
    lambda name: unquote_plus(name).replace(".", "_").replace(" ", "_"),
]
NAMES = ["a", "A", "%61", "%41", "a+b", "a%20b", "a.b", "a_b", "b", "a[]", "a%5B%5D"]


def parameters(pairs: Sequence[tuple[str, str]],
               reading: Callable[[str], str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        found.setdefault(reading(name), []).append(value)
    return found


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["1", "2"])), max_size=6),
       st.data())
def test_sorted_query_key_is_shared_only_by_equivalent_queries(pairs, data):
    """Two orders of the same parameters share a key only when every reading of the names
    gives each parameter the same list of values."""
    other = data.draw(st.permutations(pairs))
    first = "/p?" + "&".join(f"{n}={v}" for n, v in pairs)
    second = "/p?" + "&".join(f"{n}={v}" for n, v in other)
    if normalize_target(first, "sorted") == normalize_target(second, "sorted"):
        for reading in READINGS:
            assert parameters(pairs, reading) == parameters(other, reading), (first, second)


async def test_sorted_query_still_shares_plain_reorderings(sidecar_factory, mirrors, redis_url):
    """`key.query: sorted` keeps its point: distinct names in another order share one entry."""
    sidecar = await start(sidecar_factory, mirrors["app"], redis_url)
    assert (await send(sidecar.url, "/s?b=2&a=1")).stored
    assert (await send(sidecar.url, "/s?a=1&b=2")).hit


# The admin route must apply to every spelling of /api/admin/... that an upstream may resolve
# there; a spelling that routes one way as sent and another once normalised is refused.
ROUTED = [
    ("/api/admin/x", "admin"),
    ("/api/%61dmin/x", "admin"),
    ("/api%2Fadmin/x", "admin"),
    ("/api/admin/./x", "admin"),
    ("/api/admin//x", "admin"),
    ("/api/admin/y/../x", "admin"),
    ("/api/other/x", "app"),
    ("/api/./admin/x", 400),
    ("/api/x/../admin/y", 400),
    ("/api/%2e/admin/x", 400),
    ("/api/%2e%2e/api/admin/x", 400),
    ("/api/.%2e/api/admin/x", 400),
    ("//api/admin/x", 400),
    ("/api//admin/x", 400),
    ("/api/admin;jsessionid=1/x", 400),
    ("/api/x/..;/admin/y", 400),
    ("/api\\admin/x", 400),
    ("/api/admin/../other", 400),
    ("/api/admin/../../../etc/passwd", 400),
]


@pytest.mark.parametrize(("target", "expected"), ROUTED, ids=[t for t, _ in ROUTED])
async def test_route_matching_is_not_bypassed_by_encoding(sidecar_factory, mirrors, redis_url,
                                                          target, expected):
    config = make_config(mirrors["app"].url, redis_url, routes=[
        {"name": "admin", "match": {"path": "/api/admin/**"}, "upstream": "admin"},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ])
    config["upstreams"]["admin"] = {"url": mirrors["admin"].url, "timeout": "5s"}
    sidecar = await sidecar_factory(config)
    answer = await send(sidecar.url, target)
    if expected == 400:
        assert answer.status == 400, answer.body
        body = answer.json()
        assert body["error"] == "bad_request" and body["request_id"]
        assert mirrors["admin"].calls == mirrors["app"].calls == 0
    else:
        assert answer.status == 200, answer.body
        assert answer.json()["label"] == expected
        assert answer.json()["target"] == target  # forwarded as sent


# -- Vary --------------------------------------------------------------------------------------


async def test_vary_star_is_never_stored(sidecar_factory, mirrors, redis_url):
    app = mirrors["app"]
    app.headers["Vary"] = "*"
    sidecar = await start(sidecar_factory, app, redis_url)
    first = await send(sidecar.url, "/v")
    assert "detail=vary-star" in first.cache_status
    second = await send(sidecar.url, "/v")
    assert not second.hit and second.json()["call"] == 2


async def l2_variants(redis_url: str) -> list[int]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return [int(await client.hlen(key)) for key in await client.keys("sidecar:cache:e:*")]
    finally:
        await client.aclose()


async def test_variants_of_one_key_are_bounded(sidecar_factory, mirrors, redis_url):
    """Vary on a header whose values the client picks: each value is a variant, but a key
    keeps at most MAX_VARIANTS of them, in memory and in Redis."""
    app = mirrors["app"]
    app.headers["Vary"] = "X-Junk"
    sidecar = await start(sidecar_factory, app, redis_url)
    count = MAX_VARIANTS * 3
    for i in range(count):
        assert (await send(sidecar.url, "/vary", [("X-Junk", f"v{i}")])).stored
    memory = sidecar.runtime.cache.memory["cached"]
    assert memory.entries <= MAX_VARIANTS

    async def settled() -> bool:
        # (stores to Redis run in the background: two that overlap may both keep one more)
        found = await l2_variants(redis_url)
        return bool(found) and max(found) <= MAX_VARIANTS + 2

    await until(settled)
    # The most recent variants are the ones kept.
    latest = await send(sidecar.url, "/vary", [("X-Junk", f"v{count - 1}")])
    assert latest.hit
    assert app.calls == count


async def test_a_huge_vary_list_is_stored_once_and_bounded(sidecar_factory, mirrors, redis_url):
    app = mirrors["app"]
    app.headers["Vary"] = ", ".join(f"X-H{i}" for i in range(2000))
    sidecar = await start(sidecar_factory, app, redis_url)
    assert (await send(sidecar.url, "/big")).stored
    hit = await send(sidecar.url, "/big")
    assert hit.hit
    assert not (await send(sidecar.url, "/big", [("X-H7", "other")])).hit
    assert sidecar.runtime.cache.memory["cached"].entries <= MAX_VARIANTS


# -- credentials -------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_control", [None, "max-age=60", "no-cache", "private, max-age=60",
                                           "max-age=60, proxy-revalidate"])
async def test_authorized_response_not_served_to_another_client(sidecar_factory, mirrors,
                                                                redis_url, cache_control):
    """RFC 9111 §3.5: only public, s-maxage or must-revalidate let a shared cache store it."""
    app = mirrors["app"]
    app.headers.pop("Cache-Control")
    if cache_control:
        app.headers["Cache-Control"] = cache_control
    sidecar = await start(sidecar_factory, app, redis_url)
    first = await send(sidecar.url, "/me", [("Authorization", "Bearer alice")])
    assert not first.stored
    for others in ([], [("Authorization", "Bearer bob")]):
        answer = await send(sidecar.url, "/me", others)
        assert "alice" not in answer.body.decode()


@pytest.mark.parametrize("cache_control", ["public, max-age=60", "s-maxage=60",
                                           "max-age=60, must-revalidate"])
async def test_authorized_response_shared_when_it_says_so(sidecar_factory, mirrors, redis_url,
                                                          cache_control):
    app = mirrors["app"]
    app.headers["Cache-Control"] = cache_control
    sidecar = await start(sidecar_factory, app, redis_url)
    assert (await send(sidecar.url, "/doc", [("Authorization", "Bearer alice")])).stored
    assert (await send(sidecar.url, "/doc", [("Authorization", "Bearer bob")])).hit


async def test_set_cookie_response_is_not_stored_by_default(sidecar_factory, mirrors,
                                                            redis_url):
    app = mirrors["app"]
    app.headers["Set-Cookie"] = "session=alice"
    sidecar = await start(sidecar_factory, app, redis_url)
    first = await send(sidecar.url, "/login")
    assert first.headers["Set-Cookie"] == "session=alice"
    assert "detail=set-cookie" in first.cache_status
    second = await send(sidecar.url, "/login")
    assert not second.hit and app.calls == 2


async def test_stored_set_cookie_goes_only_to_its_own_client(sidecar_factory, mirrors,
                                                             redis_url):
    """store_set_cookie: true stores the response, not the cookie: the client whose request
    fetched it gets its Set-Cookie, hits do not (another client's session, replayed)."""
    app = mirrors["app"]
    app.headers["Set-Cookie"] = "session=alice"
    sidecar = await start(sidecar_factory, app, redis_url, store_set_cookie=True)
    first = await send(sidecar.url, "/landing")
    assert first.stored and first.headers.getall("Set-Cookie") == ["session=alice"]
    second = await send(sidecar.url, "/landing")
    assert second.hit and "Set-Cookie" not in second.headers


async def test_fields_named_private_are_not_stored(sidecar_factory, mirrors, redis_url):
    """RFC 9111 §5.2.2.7: `private="X-User"` lets the rest be stored, never that field."""
    app = mirrors["app"]
    app.headers.update({"Cache-Control": 'max-age=60, private="X-User"', "X-User": "alice"})
    sidecar = await start(sidecar_factory, app, redis_url)
    first = await send(sidecar.url, "/profile-frame")
    assert first.stored and first.headers["X-User"] == "alice"
    second = await send(sidecar.url, "/profile-frame")
    assert second.hit and "X-User" not in second.headers


async def test_fields_named_no_cache_are_not_reused_without_revalidation(
        sidecar_factory, mirrors, redis_url):
    """RFC 9111 §5.2.2.4: `no-cache="X-User"`: the entry is revalidated on each use."""
    app = mirrors["app"]
    app.headers.update({"Cache-Control": 'max-age=60, no-cache="X-User"', "X-User": "alice"})
    sidecar = await start(sidecar_factory, app, redis_url)
    await send(sidecar.url, "/frame")
    app.headers["X-User"] = "bob"
    second = await send(sidecar.url, "/frame")
    assert not second.hit and second.headers["X-User"] == "bob"
    assert app.calls == 2


async def test_cookie_personalised_page_does_not_leak(sidecar_factory, mirrors, redis_url):
    """A Cookie-bearing request answered without any caching headers (a personalised page,
    as most frameworks send it): the route's default ttl must not share it."""
    app = mirrors["app"]
    app.headers.pop("Cache-Control")
    sidecar = await start(sidecar_factory, app, redis_url)
    first = await send(sidecar.url, "/account", [("Cookie", "session=alice")])
    assert not first.stored and "detail=cookie" in first.cache_status
    victim = await send(sidecar.url, "/account")
    assert not victim.hit and "alice" not in victim.body.decode()
    # Without a Cookie the route's ttl still applies.
    assert (await send(sidecar.url, "/account")).hit


@pytest.mark.parametrize("cache_control", ["private", "private, max-age=60", "no-store"])
async def test_cookie_request_private_response_does_not_leak(sidecar_factory, mirrors,
                                                             redis_url, cache_control):
    app = mirrors["app"]
    app.headers["Cache-Control"] = cache_control
    sidecar = await start(sidecar_factory, app, redis_url)
    await send(sidecar.url, "/inbox", [("Cookie", "session=alice")])
    victim = await send(sidecar.url, "/inbox", [("Cookie", "session=bob")])
    assert not victim.hit and "alice" not in victim.body.decode()


async def test_cookie_keyed_or_varied_responses_are_stored_per_cookie(sidecar_factory, mirrors,
                                                                      redis_url):
    """The route keys on the cookie (key.cookies) or the upstream says Vary: Cookie: stored,
    one entry per value."""
    app = mirrors["app"]
    app.headers.pop("Cache-Control")
    keyed = await start(sidecar_factory, app, redis_url, key={"cookies": ["region"]})
    assert (await send(keyed.url, "/home", [("Cookie", "region=eu")])).stored
    us = await send(keyed.url, "/home", [("Cookie", "region=us")])
    assert not us.hit and us.json()["Cookie"] == ["region=us"]
    assert (await send(keyed.url, "/home", [("Cookie", "region=eu")])).hit

    app.headers["Vary"] = "Cookie"
    varied = await start(sidecar_factory, app, redis_url, name="varied.yaml")
    assert (await send(varied.url, "/menu", [("Cookie", "session=alice")])).stored
    bob = await send(varied.url, "/menu", [("Cookie", "session=bob")])
    assert not bob.hit and "alice" not in bob.body.decode()
