"""The Redis boundary: what Redis raises (a refused connection, an error reply, a hang)
reaches the code above the stores as StoreUnavailable, the original kept as its cause."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from support import free_port

from sidecar.stores.boundary import REDIS_ERRORS, StoreUnavailable, redis_boundary, within
from sidecar.stores.connections import HiredisPackedConnection, RedisConnections


@redis_boundary
class Lists:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def push(self, key: str, value: str) -> int:
        return await self.client.rpush(key, value)  # type: ignore[misc]

    async def _raw_push(self, key: str, value: str) -> int:  # private: left as it is
        return await self.client.rpush(key, value)  # type: ignore[misc]


async def test_a_redis_nobody_listens_on_is_unavailable() -> None:
    connections = RedisConnections(f"redis://127.0.0.1:{free_port()}", connect_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await connections.ping()
        assert isinstance(raised.value.__cause__, RedisConnectionError | OSError)
    finally:
        await connections.close()


async def test_an_error_reply_is_unavailable_and_private_methods_are_left_alone(
        redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set("boundary:string", "not a list")
        lists = Lists(client)
        assert await lists.push("boundary:list", "a") == 1
        with pytest.raises(StoreUnavailable) as raised:
            await lists.push("boundary:string", "b")  # WRONGTYPE
        assert isinstance(raised.value.__cause__, ResponseError)
        with pytest.raises(ResponseError):
            await lists._raw_push("boundary:string", "b")
    finally:
        await client.delete("boundary:string", "boundary:list")
        await client.aclose()


async def test_within_turns_a_hang_into_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match=r"within 0\.05s"):
        async with within(0.05):
            await asyncio.sleep(5)  # what a Redis that hangs looks like from here
    async with within(1.0):
        await asyncio.sleep(0)  # answered in time: nothing raised


def test_the_stores_own_code_still_catches_both() -> None:
    assert StoreUnavailable in REDIS_ERRORS and issubclass(ResponseError, REDIS_ERRORS)


async def test_the_clients_pack_with_hiredis_and_say_who_they_are(redis_url: str) -> None:
    connections = RedisConnections(redis_url, connect_timeout=1.0)
    client = connections.commands
    try:
        assert client.connection_pool.connection_class is HiredisPackedConnection
        values = {"text": "café ☕", "bytes": b"\x00\xff", "int": 42, "float": 0.1}
        for name, value in values.items():
            await client.set(f"boundary:{name}", value)
        read = [await client.get(f"boundary:{name}") for name in values]
        assert read == ["café ☕".encode(), b"\x00\xff", b"42", b"0.1"]
        # CLIENT SETNAME (two words in one argument) went through the packer at connect.
        names = [c["name"] for c in await client.client_list()]
        assert any(name.startswith("sidecar:commands:") for name in names)
        with pytest.raises(StoreUnavailable) as raised:  # DataError, as redis-py's own
            await connections.set_maxmemory(None)  # type: ignore[arg-type]
        assert isinstance(raised.value.__cause__, DataError)
    finally:
        await client.delete(*(f"boundary:{name}" for name in values))
        await connections.close()
