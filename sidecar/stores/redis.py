"""L2: cached responses in Redis, shared by every sidecar instance, with the indexes that purge
by key, prefix and tag needs. Entries expire by Redis TTL.

Layout under the `sidecar:cache:` prefix:
  e:{h}      hash: one field per Vary variant -> packed CachedResponse
  uris       sorted set of "{uri}\\0{h}" (all scores 0): purge by exact URI or by prefix
  uris:exp   the same members scored by expiry (ms): prune() drops index members whose entry
             has expired, so the index does not grow with every URL ever cached
  tag:{tag}  set of {h}
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable
from typing import cast

import orjson
import redis.asyncio as aioredis

from .entry import CachedResponse
from .memory import MAX_VARIANTS

PREFIX = "sidecar:cache:"
CHANNEL = PREFIX + "purge"


def key_hash(primary: str) -> str:
    return hashlib.blake2b(primary.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


# redis-py types its commands as "Awaitable[T] | T" (one signature for the sync and async
# clients); the casts below state what the asyncio client returns.
_Hash = Awaitable[dict[bytes, bytes]]


# Drop up to 1000 expired members from both URI indexes, atomically, in one round trip.
_PRUNE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
return #expired
"""


def _variant(values: tuple[str | None, ...]) -> bytes:
    return orjson.dumps(values)


class RedisStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def get(self, primary: str) -> list[CachedResponse]:
        fields = await cast(_Hash, self.client.hgetall(PREFIX + "e:" + key_hash(primary)))
        return [CachedResponse.unpack(value) for value in fields.values()]

    async def put(self, entry: CachedResponse, retention: float) -> None:
        h = key_hash(entry.key)
        ttl_ms = max(1000, int(retention * 1000))
        name = PREFIX + "e:" + h
        field = _variant(entry.vary_values)
        async with self.client.pipeline(transaction=True) as pipe:
            existing = await cast(_Hash, self.client.hgetall(name))
            stale_variants = []
            kept = []
            for old_field, value in existing.items():
                old = CachedResponse.unpack(value)
                if old.vary_names != entry.vary_names:
                    stale_variants.append(old_field)
                elif old_field != field:
                    kept.append((old.freshness.stored_at, old_field))
            # At most MAX_VARIANTS per key, as in memory: the oldest go.
            kept.sort()
            stale_variants += [f for _, f in kept[:max(0, len(kept) - MAX_VARIANTS + 1)]]
            if stale_variants:
                pipe.hdel(name, *stale_variants)  # type: ignore[arg-type]  # bytes fields are fine
            pipe.hset(name, mapping={field: entry.pack()})
            pipe.pexpire(name, ttl_ms, gt=True)
            pipe.pexpire(name, ttl_ms, nx=True)
            member = f"{entry.uri}\0{h}"
            pipe.zadd(PREFIX + "uris", {member: 0})
            pipe.zadd(PREFIX + "uris:exp", {member: time.time() * 1000 + ttl_ms}, gt=True)
            for tag in entry.tags:
                pipe.sadd(PREFIX + "tag:" + tag, h)
                pipe.pexpire(PREFIX + "tag:" + tag, ttl_ms, gt=True)
                pipe.pexpire(PREFIX + "tag:" + tag, ttl_ms, nx=True)
            await pipe.execute()

    async def purge(self, kind: str, value: str) -> int:
        """Delete entries by exact URI ("key"), URI prefix or tag; returns keys removed."""
        members: list[bytes] = []
        if kind == "tag":
            members_of_tag = cast(Awaitable[set[bytes]],
                                  self.client.smembers(PREFIX + "tag:" + value))
            hashes = [h.decode() for h in await members_of_tag]
            await self.client.delete(PREFIX + "tag:" + value)
        else:
            low = value + "\0" if kind == "key" else value
            members = await self.client.zrangebylex(
                PREFIX + "uris", "[" + low, "[" + low + "\xff")
            hashes = [m.decode("utf-8", "surrogateescape").rsplit("\0", 1)[1] for m in members]
        if not hashes:
            return 0
        removed = int(await self.client.delete(*(PREFIX + "e:" + h for h in hashes)))
        if members:
            await self.client.zrem(PREFIX + "uris", *members)
            await self.client.zrem(PREFIX + "uris:exp", *members)
        return removed

    async def publish_purge(self, kind: str, value: str, purge_id: str) -> int:
        """Tell every instance to drop matching L1 entries; returns how many listen."""
        return int(await self.client.publish(
            CHANNEL, orjson.dumps({"kind": kind, "value": value, "id": purge_id})))

    async def wait_acks(self, purge_id: str, expected: int, timeout: float) -> int:
        got = 0
        key = PREFIX + "ack:" + purge_id
        while got < expected:
            item = await cast(Awaitable[list[bytes] | None],
                              self.client.blpop([key], timeout=timeout))
            if item is None:
                break
            got += 1
        await self.client.delete(key)
        return got

    async def ack(self, purge_id: str) -> None:
        key = PREFIX + "ack:" + purge_id
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.rpush(key, 1)
            pipe.expire(key, 30)
            await pipe.execute()

    async def try_refresh_lock(self, primary: str, seconds: float) -> bool:
        """One background refresh per key across instances."""
        return bool(await self.client.set(PREFIX + "rl:" + key_hash(primary), 1, nx=True,
                                          px=max(100, int(seconds * 1000))))

    async def release_refresh_lock(self, primary: str) -> None:
        await self.client.delete(PREFIX + "rl:" + key_hash(primary))

    async def prune(self) -> int:
        """Forget index members whose entries Redis has expired; returns how many."""
        script = cast(Awaitable[int], self.client.eval(
            _PRUNE, 2, PREFIX + "uris", PREFIX + "uris:exp", int(time.time() * 1000)))
        return int(await script)

    async def info(self) -> dict[str, int]:
        """Indexed URIs (an upper bound on entries) and the Redis server's memory in use."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(PREFIX + "uris")
            pipe.info("memory")
            uris, memory = await pipe.execute()
        return {"entries": int(uris), "used_memory": int(memory.get("used_memory", 0))}
