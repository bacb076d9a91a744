"""`retry` end to end: a real sidecar in front of a scripted upstream, counting upstream calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from support import InProcessSidecar, Origin, free_port, gather_limited, make_config

Factory = Callable[..., Awaitable[InProcessSidecar]]
FAST = {"attempts": 2, "backoff": "1ms", "max_backoff": "5ms"}


def _routes(retry: dict[str, Any] | None = None, **extra: Any) -> list[dict[str, Any]]:
    route: dict[str, Any] = {"name": "api", "match": {"path": "/**"}, "upstream": "app", **extra}
    if retry is not None:
        route["retry"] = retry
    return [route]


async def _events(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                  route: str = "api") -> dict[str, int]:
    async with client.get(sidecar.admin_url + "/admin/stats") as response:
        stats = await response.json()
    return {e["event"]: e["count"] for e in stats["dedup"]["events"]
            if e["route"] == route and e["event"].startswith("retry")}


def _fail_first(times: int, status: int = 503) -> Callable[[web.Request, int],
                                                           Awaitable[web.Response]]:
    async def answer(request: web.Request, n: int) -> web.Response:
        body = await request.read()
        if n <= times:
            return web.Response(status=status, text=f"failure #{n}")
        return web.Response(text=f"ok #{n} {len(body)}")

    return answer


async def test_get_that_fails_once_succeeds_with_one_retry(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/flaky", _fail_first(1))
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.get(sidecar.url + "/flaky") as response:
        assert response.status == 200
        assert await response.text() == "ok #2 0"
    assert origin.calls["/flaky"] == 2
    assert await _events(client, sidecar) == {"retry": 1}


async def test_retries_give_up_after_attempts(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/down", status=503, body="still down")
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.get(sidecar.url + "/down") as response:
        assert response.status == 503
        assert await response.text() == "still down"  # the last attempt's response
    assert origin.calls["/down"] == 3
    assert await _events(client, sidecar) == {"retry": 2, "retry_gave_up": 1}


async def test_a_refused_connection_is_retried(
        sidecar_factory: Factory, redis_url: str, client: aiohttp.ClientSession) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    sidecar = await sidecar_factory(make_config(closed, redis_url, routes=_routes(FAST)))
    async with client.get(sidecar.url + "/anything") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_connect_error"
    assert await _events(client, sidecar) == {"retry": 2, "retry_gave_up": 1}


async def test_connect_errors_are_not_retried_unless_named(
        sidecar_factory: Factory, redis_url: str, client: aiohttp.ClientSession) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    sidecar = await sidecar_factory(make_config(closed, redis_url,
                                                routes=_routes({**FAST, "on": ["503"]})))
    async with client.get(sidecar.url + "/anything") as response:
        assert response.status == 502
    assert await _events(client, sidecar) == {}


async def test_a_timeout_is_retried_when_named(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    async def slow_once(request: web.Request, n: int) -> web.Response:
        if n == 1:
            await asyncio.sleep(1.0)
        return web.Response(text=f"ok #{n}")

    origin.script("/slow", slow_once)
    routes = _routes({**FAST, "on": ["timeout"]}, timeout="200ms")
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=routes))
    async with client.get(sidecar.url + "/slow") as response:
        assert response.status == 200
        assert await response.text() == "ok #2"
    assert origin.calls["/slow"] == 2


async def test_post_is_never_retried(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/orders", _fail_first(1))
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.post(sidecar.url + "/orders", data=b"{}") as response:
        assert response.status == 503
    async with client.patch(sidecar.url + "/orders", data=b"{}") as response:
        assert response.status == 200  # call 2 succeeds by script; PATCH went once too
    assert origin.calls["/orders"] == 2
    assert await _events(client, sidecar) == {}


async def test_post_with_an_idempotency_key_is_retried(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/orders", _fail_first(1, status=502))
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.post(sidecar.url + "/orders", data=b'{"item": 1}',
                           headers={"Idempotency-Key": "k-1"}) as response:
        assert response.status == 200
        assert await response.text() == "ok #2 11"  # the same body, sent again
    assert origin.calls["/orders"] == 2


async def test_the_routes_idempotency_header_names_the_key(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/orders", _fail_first(1))
    routes = _routes(FAST, idempotency={"header": "X-Request-Key"})
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=routes))
    async with client.post(sidecar.url + "/orders", data=b"{}",
                           headers={"Idempotency-Key": "ignored"}) as response:
        assert response.status == 503  # not this route's key header: sent once
    assert origin.calls["/orders"] == 1
    origin.calls.clear()
    async with client.post(sidecar.url + "/orders", data=b"{}",
                           headers={"X-Request-Key": "k-2"}) as response:
        assert response.status == 200
    assert origin.calls["/orders"] == 2


async def test_a_small_put_body_is_sent_again(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/doc", _fail_first(2))
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.put(sidecar.url + "/doc", data=b"x" * 50_000) as response:
        assert response.status == 200
        assert await response.text() == "ok #3 50000"
    assert origin.calls["/doc"] == 3


async def test_a_streamed_upload_is_not_retried(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/upload", _fail_first(1))
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 16_384  # 160 KiB, no Content-Length: forwarded as it arrives

    async with client.put(sidecar.url + "/upload", data=chunks()) as response:
        assert response.status == 503
    assert origin.calls["/upload"] == 1
    assert await _events(client, sidecar) == {"retry_skipped_body": 1}


async def test_a_streamed_error_response_is_dropped_before_the_retry(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    async def big_failure(request: web.Request, n: int) -> web.StreamResponse:
        if n > 1:
            return web.Response(text="ok")
        response = web.StreamResponse(status=503)
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"z" * 16_384)  # 1 MiB: too big to arrive whole
        await response.write_eof()
        return response

    origin.script("/big", big_failure)
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.get(sidecar.url + "/big") as response:
        assert response.status == 200
        assert await response.text() == "ok"
    assert origin.calls["/big"] == 2


async def test_statuses_not_in_on_are_not_retried(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.script("/bug", _fail_first(1, status=500))
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(FAST)))
    async with client.get(sidecar.url + "/bug") as response:
        assert response.status == 500
    assert origin.calls["/bug"] == 1


async def test_the_budget_caps_retries_under_sustained_failure(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/down", status=503)
    routes = _routes({**FAST, "budget": "10%"})
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=routes))

    async def get() -> int:
        async with client.get(sidecar.url + "/down") as response:
            await response.read()
            return response.status

    statuses = await gather_limited([get() for _ in range(100)], limit=10)
    assert statuses == [503] * 100
    # Without a budget: 300 calls. With it: 100 requests, 10% of them (10) in retries, plus the
    # floor of 3 retries a second over the 10 s window (30).
    assert 100 < origin.calls["/down"] <= 100 + 10 + 30
    events = await _events(client, sidecar)
    assert events["retry"] == origin.calls["/down"] - 100
    assert events["retry_budget_exhausted"] > 0


async def test_backoff_is_capped(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/down", status=503)
    # Uncapped, 3 retries from a 1 s base could wait up to 1 + 2 + 4 s.
    retry = {"attempts": 3, "backoff": "1s", "max_backoff": "100ms"}
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=_routes(retry)))
    started = time.monotonic()
    async with client.get(sidecar.url + "/down") as response:
        assert response.status == 503
    assert time.monotonic() - started < 0.3 + 1.0  # 3 waits of at most 100 ms, plus slack
    assert origin.calls["/down"] == 4


async def test_the_routes_retry_overrides_the_upstreams(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/own/x", status=503)
    origin.reply("/inherited/x", status=503)
    config = make_config(origin.url, redis_url, routes=[
        {"name": "own", "match": {"path": "/own/**"}, "upstream": "app",
         "retry": {**FAST, "on": ["502"]}},
        {"name": "inherited", "match": {"path": "/inherited/**"}, "upstream": "app"},
    ])
    config["upstreams"]["app"]["retry"] = {**FAST, "on": ["503"]}
    sidecar = await sidecar_factory(config)
    for path in ("/own/x", "/inherited/x"):
        async with client.get(sidecar.url + path) as response:
            assert response.status == 503
    assert origin.calls["/own/x"] == 1
    assert origin.calls["/inherited/x"] == 3


async def test_zero_attempts_turns_retries_off(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/down", status=503)
    config = make_config(origin.url, redis_url, routes=_routes({"attempts": 0}))
    config["upstreams"]["app"]["retry"] = FAST
    sidecar = await sidecar_factory(config)
    async with client.get(sidecar.url + "/down") as response:
        assert response.status == 503
    assert origin.calls["/down"] == 1
