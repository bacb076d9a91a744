"""Routing through the proxy: path, method, host and header matches; first match wins; 404."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import InProcessSidecar, free_port, make_config

from sidecar.config import Config
from sidecar.routing import RouteTable

StartSidecar = Callable[..., Awaitable[InProcessSidecar]]


TAG = web.AppKey("tag", str)


async def _tagged(request: web.Request) -> web.Response:
    return web.json_response({"upstream": request.app[TAG], "path": request.path})


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, str]]:
    """Three real upstreams, `a`, `b` and `c`, each answering any request with its own name."""
    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    for tag in ("a", "b", "c"):
        app = web.Application()
        app[TAG] = tag
        app.router.add_route("*", "/{tail:.*}", _tagged)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[tag] = f"http://127.0.0.1:{port}"
    yield urls
    for runner in runners:
        await runner.cleanup()


async def _start(sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
                 routes: list[dict[str, Any]]) -> InProcessSidecar:
    config = make_config(upstreams["a"], redis_url, routes=routes)
    config["upstreams"] = {tag: {"url": url, "timeout": "5s"} for tag, url in upstreams.items()}
    return await sidecar_factory(config)


async def _which(client: aiohttp.ClientSession, url: str, method: str = "GET",
                 headers: dict[str, str] | None = None) -> str | int:
    """The upstream that answered, or the status when the sidecar answered itself."""
    async with client.request(method, url, headers=headers) as response:
        if response.status != 200:
            return response.status
        return str((await response.json())["upstream"])


async def test_path_globs_pick_the_route(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        {"name": "one-segment", "match": {"path": "/api/*"}, "upstream": "a"},
        {"name": "static", "match": {"path": "/static/**"}, "upstream": "b"},
        {"name": "exact", "match": {"path": "/health"}, "upstream": "a"},
        {"name": "rest", "match": {"path": "/**"}, "upstream": "c"},
    ])
    expected = {
        "/api/x": "a", "/api/x/y": "c", "/api": "c",
        "/static": "b", "/static/": "b", "/static/css/site.css": "b", "/staticx": "c",
        "/health": "a", "/health/": "c", "/": "c",
    }
    got = {path: await _which(client, sidecar.url + path) for path in expected}
    assert got == expected


async def test_query_string_does_not_affect_path_match(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        {"name": "exact", "match": {"path": "/search"}, "upstream": "a"},
        {"name": "rest", "match": {"path": "/**"}, "upstream": "b"},
    ])
    assert await _which(client, sidecar.url + "/search?q=/x/y&page=2") == "a"


async def test_methods(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        # lower case in the config is accepted and means the same method
        {"name": "reads", "match": {"path": "/items/**", "methods": ["get", "HEAD"]},
         "upstream": "a"},
        {"name": "writes", "match": {"path": "/items/**", "methods": ["POST", "PUT"]},
         "upstream": "b"},
    ])
    assert await _which(client, sidecar.url + "/items/1", "GET") == "a"
    assert await _which(client, sidecar.url + "/items/1", "POST") == "b"
    assert await _which(client, sidecar.url + "/items/1", "PUT") == "b"
    assert await _which(client, sidecar.url + "/items/1", "DELETE") == 404
    async with client.head(sidecar.url + "/items/1") as response:
        assert response.status == 200


async def test_host_globs(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        {"name": "sub", "match": {"host": "*.example.com"}, "upstream": "a"},
        {"name": "apex", "match": {"host": "example.com"}, "upstream": "b"},
        {"name": "rest", "upstream": "c"},
    ])
    cases = {
        "api.example.com": "a", "API.Example.com:8443": "a", "example.com": "b",
        "example.com:80": "b", "a.b.example.com": "c", "example.org": "c",
    }
    got = {host: await _which(client, sidecar.url + "/x", headers={"Host": host})
           for host in cases}
    assert got == cases


async def test_header_matches(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        {"name": "blue", "match": {"headers": {"X-Tenant": "blue", "X-Beta": "1"}},
         "upstream": "a"},
        {"name": "tenant-only", "match": {"headers": {"x-tenant": "blue"}}, "upstream": "b"},
        {"name": "rest", "upstream": "c"},
    ])
    url = sidecar.url + "/x"
    # header names are case-insensitive, every listed header must match
    assert await _which(client, url, headers={"x-tenant": "blue", "x-beta": "1"}) == "a"
    assert await _which(client, url, headers={"X-Tenant": "blue"}) == "b"
    assert await _which(client, url, headers={"X-Tenant": "blue", "X-Beta": "2"}) == "b"
    # values compare exactly
    assert await _which(client, url, headers={"X-Tenant": "Blue"}) == "c"
    assert await _which(client, url) == "c"


async def test_first_match_wins(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        {"name": "broad", "match": {"path": "/api/**"}, "upstream": "a"},
        {"name": "narrow", "match": {"path": "/api/special"}, "upstream": "b"},
        {"name": "everything", "upstream": "c"},
    ])
    assert await _which(client, sidecar.url + "/api/special") == "a"
    assert await _which(client, sidecar.url + "/other") == "c"


async def test_no_route_is_a_json_404(
    sidecar_factory: StartSidecar, upstreams: dict[str, str], redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await _start(sidecar_factory, upstreams, redis_url, [
        {"name": "api", "match": {"path": "/api/**", "methods": ["GET"]}, "upstream": "a"},
    ])
    for method, path in (("GET", "/nope"), ("POST", "/api/x")):
        async with client.request(method, sidecar.url + path) as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            body = await response.json()
            assert body["error"] == "no_route"
            assert path in body["detail"]
            assert method in body["detail"]
            assert body["request_id"] == response.headers["X-Request-ID"]
            assert response.headers["Cache-Control"] == "no-store"


def test_route_table_directly() -> None:
    config = Config.model_validate({
        "upstreams": {"app": {"url": "http://127.0.0.1:1"}},
        "routes": [
            {"name": "r1", "match": {"path": "/a/*", "methods": ["GET"],
                                     "host": "*.x.test", "headers": {"X-K": "v"}},
             "upstream": "app"},
            {"name": "r2", "match": {"path": "/a/**"}, "upstream": "app"},
        ],
    })
    table = RouteTable(config)

    def name(method: str, host: str, path: str, headers: dict[str, str]) -> str | None:
        route = table.match(method, host, path, headers)
        return route.name if route else None

    assert name("GET", "h.x.test", "/a/1", {"X-K": "v"}) == "r1"
    assert name("POST", "h.x.test", "/a/1", {"X-K": "v"}) == "r2"
    assert name("GET", "x.test", "/a/1", {"X-K": "v"}) == "r2"
    assert name("GET", "h.x.test", "/a/1", {}) == "r2"
    assert name("GET", "h.x.test", "/a/1/2", {"X-K": "v"}) == "r2"
    assert name("GET", "h.x.test", "/b", {}) is None
