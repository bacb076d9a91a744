"""Secrets at rest (redis.encryption_keys): the sealer alone, then real traffic through an
in-process sidecar and a scan of every value in the real Redis behind it."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from support import Origin, make_config, until, write_config

from sidecar.config import ConfigError, load_config
from sidecar.crypto import Sealer, SealError, new_key, parse_key

CREDENTIAL = "Bearer tok-5e5e5e5e5e5e5e"
BODY = b"body-secret-7f7f7f7f"
ANSWER = "answer-secret-3c3c3c3c"


def test_sealing_opens_with_any_listed_key_and_nothing_else() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = Sealer([old]).seal(b"payload", "k:1")
    assert b"payload" not in sealed and sealed.startswith(b"SC1")
    assert Sealer([new, old]).open(sealed, "k:1") == b"payload"  # rotated: old still opens
    with pytest.raises(SealError, match=r"not in redis\.encryption_keys"):
        Sealer([new]).open(sealed, "k:1")
    with pytest.raises(SealError, match="moved from another key"):
        Sealer([old]).open(sealed, "k:2")  # bound to its Redis key
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError, match="altered"):
        Sealer([old]).open(tampered, "k:1")
    with pytest.raises(SealError, match="cut short"):
        Sealer([old]).open(b"SC1abc", "k:1")
    assert Sealer([old]).open(b"written before", "k:1") == b"written before"
    assert Sealer().seal(b"x", "k") == b"x"  # off: as it is
    text = Sealer([old]).seal_text("GET / HTTP/1.1", "f")
    assert "GET" not in text and Sealer([old]).open_text(text, "f") == "GET / HTTP/1.1"


def test_keys_are_checked_where_they_are_written(tmp_path: Path) -> None:
    assert len(parse_key(new_key())) == 32
    assert parse_key(base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")) == b"k" * 32
    for keys, expected in ((["short"], "sidecar keygen"), ([new_key()] * 2, "listed twice")):
        path = write_config(tmp_path / "c.yaml", make_config(
            "http://127.0.0.1:1", "redis://127.0.0.1:1/0", redis={"encryption_keys": keys}))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert "redis.encryption_keys" in str(caught.value) and expected in str(caught.value)


def config(origin: Origin, redis_url: str, keys: list[str]) -> dict[str, Any]:
    return make_config(origin.url, redis_url, redis={"url": redis_url, "encryption_keys": keys},
                       routes=[
        {"name": "reports", "match": {"path": "/api/reports/**"}, "upstream": "app",
         "offload": {"queue": "default"}},
        {"name": "orders", "match": {"path": "/api/orders/**"}, "upstream": "app",
         "idempotency": {}},
        {"name": "products", "match": {"path": "/api/products/**"}, "upstream": "app",
         "cache": {"ttl": "60s"}},
    ])


async def everything_in(redis_url: str) -> list[bytes]:
    """Every key and every value in the Redis, read by type (DUMP's output may be compressed,
    and would hide a plaintext from the search)."""
    client = aioredis.Redis.from_url(redis_url)
    found: list[bytes] = []
    try:
        async for key in client.scan_iter(count=1000):
            found.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                found.append(await client.get(key) or b"")
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    found += [field, value]
            elif kind == "list":
                found += await client.lrange(key, 0, -1)
            elif kind == "set":
                found += list(await client.smembers(key))
            elif kind == "zset":
                found += await client.zrange(key, 0, -1)
            elif kind == "stream":
                for _, fields in await client.xrange(key):
                    for field, value in fields.items():
                        found += [field, value]
    finally:
        await client.aclose()
    return found


def script(origin: Origin) -> None:
    async def report(request: web.Request, n: int) -> web.Response:
        await request.read()
        return web.Response(text=ANSWER + " report")

    async def order(request: web.Request, n: int) -> web.Response:
        return web.Response(text=ANSWER + " order", status=201)

    async def product(request: web.Request, n: int) -> web.Response:
        return web.Response(text=ANSWER + " product",
                            headers={"Cache-Control": "public, max-age=60"})
    origin.script("/api/reports/day", report)
    origin.script("/api/orders/new", order)
    origin.script("/api/products/1", product)


async def traffic(client: aiohttp.ClientSession, base: str) -> str:
    """A job, an idempotent order and a cached product, all with the credential; the job's
    result URL once it succeeded."""
    auth = {"Authorization": CREDENTIAL}
    async with client.post(base + "/api/reports/day", data=BODY, headers=auth) as response:
        assert response.status == 202
        accepted = await response.json()
    async with client.post(base + "/api/orders/new", data=BODY,
                           headers={**auth, "Idempotency-Key": "order-1"}) as response:
        assert response.status == 201
    async with client.get(base + "/api/products/1", headers=auth) as response:
        assert response.status == 200

    async def done() -> bool:
        async with client.get(base + accepted["status_url"], headers=auth) as response:
            return (await response.json())["status"] == "succeeded"
    await until(done)
    return str(accepted["result_url"])


def plaintexts(values: list[bytes]) -> set[str]:
    secrets = {"credential": CREDENTIAL.split()[1].encode(), "body": BODY,
               "answer": ANSWER.encode()}
    return {name for name, secret in secrets.items()
            if any(secret in value for value in values)}


async def test_no_credential_body_or_answer_is_stored_in_clear(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    script(origin)
    # Without keys the scan finds all three (so that it can find them at all)...
    plain = await sidecar_factory(config(origin, redis_url, []), "plain.yaml")
    await traffic(client, plain.url)
    assert plaintexts(await everything_in(redis_url)) == {"credential", "body", "answer"}
    await plain.runtime.stop()
    flush = aioredis.Redis.from_url(redis_url)
    await flush.flushall()
    await flush.aclose()
    # ... and with a key, none of them.
    sealed = await sidecar_factory(config(origin, redis_url, [new_key()]), "sealed.yaml")
    result_url = await traffic(client, sealed.url)
    assert plaintexts(await everything_in(redis_url)) == set()
    async with client.get(sealed.url + result_url,
                          headers={"Authorization": CREDENTIAL}) as response:
        assert await response.text() == ANSWER + " report"  # and all of it reads back
    async with client.post(sealed.url + "/api/orders/new", data=BODY, headers={
            "Authorization": CREDENTIAL, "Idempotency-Key": "order-1"}) as response:
        assert response.status == 201 and await response.text() == ANSWER + " order"
        assert response.headers.get("Idempotent-Replayed") == "true"


async def test_a_rotation_keeps_old_records_and_a_lost_key_gives_clear_errors(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    script(origin)
    old, new = new_key(), new_key()
    raw = config(origin, redis_url, [old])
    sidecar = await sidecar_factory(raw)
    first = await traffic(client, sidecar.url)
    auth = {"Authorization": CREDENTIAL}

    raw["redis"]["encryption_keys"] = [new, old]  # rotate: the new key seals, both open
    write_config(sidecar.config_path, raw)
    assert await sidecar.runtime.reload("test")
    async with client.get(sidecar.url + first, headers=auth) as response:
        assert response.status == 200 and await response.text() == ANSWER + " report"
    async with client.get(sidecar.url + "/api/products/1", headers=auth) as response:
        assert "hit" in response.headers["Cache-Status"]

    raw["redis"]["encryption_keys"] = [new]  # the old key dropped too early
    write_config(sidecar.config_path, raw)
    assert await sidecar.runtime.reload("test")
    for layer in sidecar.runtime.cache.memory.values():  # L1 is memory: Redis is what rests
        layer.remove_where(lambda entry: True)
    async with client.get(sidecar.url + first, headers=auth) as response:
        assert response.status == 500
        error = await response.json()
        assert error["error"] == "job_result_unreadable"
        assert "not in redis.encryption_keys" in error["detail"]
    async with client.get(sidecar.url + "/api/products/1", headers=auth) as response:
        assert response.status == 200 and "miss" in response.headers["Cache-Status"]
        assert await response.text() == ANSWER + " product"  # fetched again, never garbage
